"""SQLite storage: one connection, a lock, short transactions, versioned schema.

The database file lives in the data directory (mode 0600). It runs in WAL mode
with ``synchronous=FULL``: a transaction that returned has reached the disk,
so whatever a caller is told is done (a user made, a token revoked, a refresh
token rotated) survives a crash.

Thread safety: the Thrift and HTTP servers call from many threads. The
:class:`Database` holds one connection behind a re-entrant lock; every use is a
short critical section (no password hashing or network I/O inside).
Read-modify-write goes through :meth:`Database.transaction`, which starts with
``BEGIN IMMEDIATE`` so that it also excludes writers in other processes (the
``auth-rpc`` admin commands). The lock is re-entrant so that a store method
called inside another store's transaction joins it.

Schema versions: ``PRAGMA user_version`` holds the number of migrations
applied; :data:`MIGRATIONS` lists them in order, and :meth:`Database.open`
applies the missing ones in one transaction. Add a migration by appending to
the tuple, never by editing one that shipped.

Only this module and the small store classes (``accounts.AccountStore``,
``keys.KeyStore``, ``tokens.RefreshStore``, ``tokens.RevocationStore``,
``tokens.IssuedTokenStore``,
``status.StatusListStore``) speak SQL. The same store classes run on
PostgreSQL (``--database-url``): :func:`open_database` returns either this
:class:`Database` or a :class:`~auth_rpc.serving.sqlstore.PostgresDatabase`
(same interface; its schema in :mod:`auth_rpc.auth.schema_postgresql`, same
versions), and the stores pick another statement only where the dialects differ
(``db.dialect``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from auth_rpc.auth.schema_postgresql import PG_MIGRATIONS
from auth_rpc.errors import DependencyUnavailable, storage_failure
from auth_rpc.serving.private_files import check_private_stat
from auth_rpc.serving.sqlstore import SQLITE, PgConnection, PostgresDatabase

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "AnyDatabase",
    "Connection",
    "Database",
    "NewDatabaseRefused",
    "open_database",
]

log = logging.getLogger("auth_rpc.auth.db")

#: Ordered migrations; the n-th (1-based) brings the schema to version n.
MIGRATIONS: tuple[str, ...] = (
    # 1: users, clients, signing keys, refresh token families, revocations.
    """
    CREATE TABLE users (
        username      TEXT PRIMARY KEY NOT NULL,
        password_hash TEXT NOT NULL,
        scopes        TEXT NOT NULL,
        created_at    INTEGER NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE clients (
        client_id   TEXT PRIMARY KEY NOT NULL,
        secret_hash TEXT NOT NULL,
        scopes      TEXT NOT NULL,
        created_at  INTEGER NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE signing_keys (
        kid           TEXT PRIMARY KEY NOT NULL,
        alg           TEXT NOT NULL,
        created_at    INTEGER NOT NULL,
        superseded_at INTEGER,
        max_ttl_s     INTEGER NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE refresh_families (
        family_id  TEXT PRIMARY KEY NOT NULL,
        subject    TEXT NOT NULL,
        client_id  TEXT NOT NULL,
        scopes     TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        revoked_at INTEGER
    ) WITHOUT ROWID;
    CREATE INDEX refresh_families_expires ON refresh_families (expires_at);

    CREATE TABLE refresh_tokens (
        token_hash BLOB PRIMARY KEY NOT NULL,
        family_id  TEXT NOT NULL REFERENCES refresh_families (family_id) ON DELETE CASCADE,
        issued_at  INTEGER NOT NULL,
        used_at    INTEGER
    ) WITHOUT ROWID;
    CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);

    CREATE TABLE family_access_tokens (
        jti        TEXT PRIMARY KEY NOT NULL,
        family_id  TEXT NOT NULL REFERENCES refresh_families (family_id) ON DELETE CASCADE,
        expires_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX family_access_tokens_family ON family_access_tokens (family_id);

    CREATE TABLE revoked_tokens (
        jti        TEXT PRIMARY KEY NOT NULL,
        expires_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX revoked_tokens_expires ON revoked_tokens (expires_at);
    """,
    # 2: throttling streaks, shared by every process on the data dir (--workers).
    """
    CREATE TABLE throttle_streaks (
        kind     TEXT NOT NULL,
        key      TEXT NOT NULL,
        failures INTEGER NOT NULL,
        last     REAL NOT NULL,
        PRIMARY KEY (kind, key)
    ) WITHOUT ROWID;
    CREATE INDEX throttle_streaks_last ON throttle_streaks (last);
    """,
    # 3: a fast digest (SHA-256) of each client secret. Client secrets are 256
    # random bits made by the service, so a fast digest is as safe to store as
    # argon2 and lets a correct secret through at once, whatever guesses an
    # attacker has made for the id. NULL for clients registered before v3
    # until their next successful authentication.
    """
    ALTER TABLE clients ADD COLUMN secret_digest BLOB;
    """,
    # 4: RFC 8707 resource indicators. The audiences a user or client may ask
    # tokens for (space separated, in the order given); NULL = only the
    # service's default audience (--audience), so that accounts made before
    # v4 keep working unchanged. A refresh token family remembers the
    # audience of its login (NULL = the default), which a refresh keeps
    # unless it asks for another.
    """
    ALTER TABLE users ADD COLUMN audiences TEXT;
    ALTER TABLE clients ADD COLUMN audiences TEXT;
    ALTER TABLE refresh_families ADD COLUMN audience TEXT;
    """,
    # 5: Token Status Lists (draft-ietf-oauth-status-list). Every access token
    # gets an entry (status.status_list {idx, uri}) in a list; revoking it sets
    # the entry's bit. status_lists: one row per list ever started (ids are
    # never reused: a retired list keeps its row); `allocated` counts the
    # indices given out, in the transaction that issues each token (the n-th
    # index is a keyed permutation of n, with `perm_key`, so indices are not
    # sequential and never given twice); `version` grows whenever a bit is set
    # (a served list is encoded once per version); `last_exp` is the latest exp
    # of its tokens: once past, a full list is retired (its bits deleted, no
    # longer served). status_bits: the bits set (revoked entries). A family's
    # access tokens remember their entry, so that revoking the family sets them.
    """
    CREATE TABLE status_lists (
        list_id    INTEGER PRIMARY KEY NOT NULL,
        capacity   INTEGER NOT NULL,
        allocated  INTEGER NOT NULL,
        perm_key   BLOB NOT NULL,
        version    INTEGER NOT NULL,
        last_exp   INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        retired_at INTEGER
    );

    CREATE TABLE status_bits (
        list_id INTEGER NOT NULL REFERENCES status_lists (list_id),
        idx     INTEGER NOT NULL,
        PRIMARY KEY (list_id, idx)
    ) WITHOUT ROWID;

    ALTER TABLE family_access_tokens ADD COLUMN status_list INTEGER;
    ALTER TABLE family_access_tokens ADD COLUMN status_idx INTEGER;
    """,
    # 6: keys published before they sign. activates_at: when a key starts
    # signing (NULL = from when it was made: keys made before v6, first keys,
    # emergency rotations); the key it replaces has superseded_at = that time.
    """
    ALTER TABLE signing_keys ADD COLUMN activates_at INTEGER;
    """,
    # 7: introspection is a permission a client is given (add-client
    # --introspect), no longer open to every registered client. Clients
    # registered before, with `introspect` among their scopes (how the
    # documentation registered a resource server's client), keep it.
    """
    ALTER TABLE clients ADD COLUMN may_introspect INTEGER NOT NULL DEFAULT 0;
    UPDATE clients SET may_introspect = 1
        WHERE instr(' ' || scopes || ' ', ' introspect ') > 0;
    """,
    # 8: throttled attempts in flight, shared by every process (--workers): an
    # attempt is reserved (one row) in the transaction that checks its key's
    # streak, before its password is checked, and its row is deleted with its
    # outcome. expires_at: when a reservation of a crashed process stops counting.
    """
    CREATE TABLE throttle_reservations (
        kind        TEXT NOT NULL,
        key         TEXT NOT NULL,
        reservation TEXT NOT NULL,
        expires_at  REAL NOT NULL,
        PRIMARY KEY (kind, key, reservation)
    ) WITHOUT ROWID;
    CREATE INDEX throttle_reservations_expires ON throttle_reservations (expires_at);
    """,
    # 9: accounts administration (auth-rpc disable, enable, remove). disabled_at:
    # when a user or client was disabled (NULL = enabled). issued_access_tokens:
    # the Status List entry of every access token issued from v9 on, with its
    # subject and client_id, kept until it expires, so that disabling or
    # removing an account (or resetting its password or secret) revokes its
    # live access tokens by setting their bits.
    """
    ALTER TABLE users ADD COLUMN disabled_at INTEGER;
    ALTER TABLE clients ADD COLUMN disabled_at INTEGER;

    CREATE TABLE issued_access_tokens (
        status_list INTEGER NOT NULL,
        status_idx  INTEGER NOT NULL,
        subject     TEXT NOT NULL,
        client_id   TEXT NOT NULL,
        expires_at  INTEGER NOT NULL,
        PRIMARY KEY (status_list, status_idx)
    ) WITHOUT ROWID;
    CREATE INDEX issued_access_tokens_subject ON issued_access_tokens (subject);
    CREATE INDEX issued_access_tokens_client ON issued_access_tokens (client_id);
    CREATE INDEX issued_access_tokens_expires ON issued_access_tokens (expires_at);
    """,
    # 10: signing keys sealed in the database (PostgreSQL replicas share them;
    # auth_rpc.auth.keys.KeySealer). On SQLite the column stays NULL: the key
    # is the file keys/<kid>.pem, as before.
    """
    ALTER TABLE signing_keys ADD COLUMN sealed_key BLOB;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
assert len(PG_MIGRATIONS) == SCHEMA_VERSION, "one version sequence for both dialects"


class NewDatabaseRefused(ValueError):
    """The database is new (missing or empty) where an existing one was expected."""

_UNAVAILABLE = "database unavailable"


class Database:
    """One SQLite connection shared by all threads, behind a lock.

    Every ``sqlite3.Error`` raised inside :meth:`transaction` or :meth:`read`
    becomes :class:`~auth_rpc.errors.DependencyUnavailable` (logged without
    parameters); other exceptions roll the transaction back and pass through.
    """

    dialect = SQLITE
    #: Appended to a SELECT whose rows the transaction writes back: nothing on
    #: SQLite (``BEGIN IMMEDIATE`` already excludes every other writer).
    for_update = ""
    IntegrityError: type[Exception] = sqlite3.IntegrityError

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.RLock()
        self._depth = 0
        self.path = path
        #: Whether :meth:`open` made the schema (the file was missing or empty).
        self.created = False

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        busy_timeout_s: float = 5.0,
        migrations: tuple[str, ...] = MIGRATIONS,
        allow_new: bool = True,
    ) -> Database:
        """Open (creating with mode 0600) the database at ``path``, check it, migrate it.

        Before anything is written: a file another user owns or group/others
        may write is refused (:class:`~auth_rpc.serving.private_files.UnsafeFile`),
        and so is a damaged one (``PRAGMA quick_check``;
        :class:`DependencyUnavailable` naming SQLite's message). With
        ``allow_new=False`` a new database (missing, empty, or with no schema)
        raises :class:`NewDatabaseRefused`. :attr:`created` tells whether the
        schema was made by this call. Raises :class:`DependencyUnavailable` if
        SQLite fails, ``ValueError`` if the file's schema is newer than
        ``migrations`` knows.
        """
        path = Path(path)
        existed = path.exists()
        try:
            # Create the file ourselves so that it (and SQLite's -wal and -shm
            # files, which copy its mode) is never readable by others.
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                check_private_stat(os.fstat(fd), path, "database")
                if os.fstat(fd).st_mode & 0o077:
                    log.warning("restricting the database file to its owner (mode 0600)")
                    os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
            conn = sqlite3.connect(
                str(path),
                timeout=busy_timeout_s,
                isolation_level=None,  # autocommit; transactions are explicit
                check_same_thread=False,  # shared behind Database._lock
            )
        except (sqlite3.Error, OSError) as exc:
            log.error("cannot open the database: %s", storage_failure(exc))
            raise DependencyUnavailable(f"{_UNAVAILABLE}: {storage_failure(exc)}") from exc
        db = cls(conn, path)
        try:
            db.created = db._check(conn, allow_new=allow_new, existed=existed)
            with db._locked() as c:
                c.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
                mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    log.warning("SQLite refused WAL mode (journal_mode=%s)", mode)
                c.execute("PRAGMA synchronous = FULL")
                c.execute("PRAGMA foreign_keys = ON")
            db._migrate(migrations)
        except BaseException:
            db.close()
            raise
        return db

    def _check(self, conn: sqlite3.Connection, *, allow_new: bool, existed: bool) -> bool:
        """Whether the database is new; refuses a damaged one (and a new one unless allowed)."""
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            rows = conn.execute("PRAGMA quick_check").fetchall()
        except sqlite3.Error as exc:
            raise DependencyUnavailable(
                f"the database {self.path} cannot be used: {storage_failure(exc)}; "
                "restore it from a backup"
            ) from exc
        problems = [str(row[0]) for row in rows if str(row[0]) != "ok"]
        if problems:
            detail = "; ".join(" ".join(p.split()) for p in problems[:3])
            raise DependencyUnavailable(
                f"the database {self.path} is damaged (SQLite quick_check: {detail}); "
                "restore it from a backup"
            )
        if version == 0 and not allow_new:
            if not existed:
                conn.close()
                self._conn = None
                self.path.unlink(missing_ok=True)
            raise NewDatabaseRefused(f"the database {self.path} is new (missing or empty)")
        return version == 0

    def _migrate(self, migrations: tuple[str, ...]) -> None:
        with self.transaction() as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > len(migrations):
                raise ValueError(
                    f"database schema version {version} is newer than this program "
                    f"(knows {len(migrations)}); upgrade auth-rpc"
                )
            for number in range(version + 1, len(migrations) + 1):
                log.info("migrating the database schema to version %d", number)
                for statement in _statements(migrations[number - 1]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")

    @property
    def schema_version(self) -> int:
        """The schema version of the open database."""
        with self.read() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise DependencyUnavailable("database closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                log.error("database error: %s", storage_failure(exc))
                raise DependencyUnavailable(_UNAVAILABLE) from exc

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: committed on success, else rolled back.

        Nested use on the same thread joins the outer transaction. Raises
        :class:`DependencyUnavailable` on any SQLite error.
        """
        with self._locked() as conn:
            if self._depth:
                self._depth += 1
                try:
                    yield conn
                finally:
                    self._depth -= 1
                return
            conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield conn
            except BaseException:
                self._depth = 0
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        log.error("rollback failed")
                raise
            self._depth = 0
            conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """The connection for reads (autocommit statements, or inside a transaction).

        Raises :class:`DependencyUnavailable` on any SQLite error.
        """
        with self._locked() as conn:
            yield conn

    def lock(self, conn: Any, name: str) -> None:
        """A named lock until the end of the transaction: nothing to do on SQLite,
        whose ``BEGIN IMMEDIATE`` already excludes every other writer."""

    def notify(self, conn: Any, channel: str, payload: str = "") -> None:
        """Tell other replicas (PostgreSQL ``NOTIFY``): none on SQLite."""

    def ping(self) -> bool:
        """Whether the database answers a trivial query."""
        try:
            with self.read() as conn:
                conn.execute("SELECT 1").fetchone()
        except DependencyUnavailable:
            return False
        return True

    def close(self) -> None:
        """Close the connection; later calls raise :class:`DependencyUnavailable`. Idempotent."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:  # pragma: no cover - nothing useful to do
                log.warning("error while closing the database")


#: Either dialect's database, and a connection of one (both take ``?`` statements).
AnyDatabase = Database | PostgresDatabase
Connection = sqlite3.Connection | PgConnection


def on_postgresql(conn: Connection) -> bool:
    """Whether ``conn`` is a PostgreSQL connection (the statement to use differs)."""
    return isinstance(conn, PgConnection)


def open_database(
    path: Path, *, database_url: str | None = None, allow_new: bool = True
) -> AnyDatabase:
    """The Auth database: PostgreSQL at ``database_url`` if given, else SQLite at ``path``.

    On PostgreSQL a database without the Auth schema counts as new
    (:class:`NewDatabaseRefused` unless ``allow_new``).
    """
    if database_url is None:
        return Database.open(path, allow_new=allow_new)
    try:
        return PostgresDatabase.open(
            database_url,
            component="auth",
            migrations=PG_MIGRATIONS,
            allow_new=allow_new,
            application_name="auth-rpc",
        )
    except ValueError as exc:
        if "has no auth schema" in str(exc):
            raise NewDatabaseRefused(str(exc)) from None
        raise


def _statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would COMMIT our transaction)."""
    parts: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                parts.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise ValueError("incomplete SQL statement in a migration")
    return parts
