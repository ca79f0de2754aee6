"""``posts-rpc migrate``: move a SQLite data directory's posts to PostgreSQL.

Every post is copied as it is (its id, author, title, body and times), and
the PostgreSQL id sequence is set past the highest id SQLite ever gave
(``sqlite_sequence``: a deleted newest post's id is not given again either),
so that links to posts keep working and no id is reused. The copy is one
transaction on each side: SQLite is read under ``BEGIN IMMEDIATE`` (no writer
can change it meanwhile: stop ``posts-rpc serve`` first anyway), PostgreSQL is
written with ``COPY`` in one transaction that also checks the count before it
commits; on any failure nothing is left in PostgreSQL but the empty schema.
A target that already holds posts is refused. The replicas already listening
on the target (there should be none) drop their page caches: the table's
trigger notifies them. The SQLite data directory is not changed (beyond
bringing its schema to this version) and stays a backup.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from auth_rpc.errors import DependencyUnavailable, storage_failure
from auth_rpc.serving.sqlstore import PostgresDatabase
from posts_rpc.schema_postgresql import PG_MIGRATIONS
from posts_rpc.server import DB_FILE_NAME
from posts_rpc.store import SqlitePostStore

__all__ = ["TargetNotEmpty", "migrate_to_postgresql"]

log = logging.getLogger("posts_rpc.migrate")

_COLUMNS = ("id", "author", "title", "body", "created_at", "updated_at")


class TargetNotEmpty(ValueError):
    """The PostgreSQL database already holds posts."""


def migrate_to_postgresql(data_dir: Path, url: str) -> int:
    """Copy every post of ``data_dir``'s SQLite database to the PostgreSQL one at ``url``.

    Returns the number of posts copied. Raises ``ValueError`` (no database in
    ``data_dir``; :class:`TargetNotEmpty`), ``DependencyUnavailable`` (either
    database failed; nothing was written).
    """
    path = Path(data_dir) / DB_FILE_NAME
    if not path.is_file():
        raise ValueError(f"no post database at {path}: nothing to migrate")
    SqlitePostStore.open(path).close()  # its checks (owner, mode) and its schema version
    target = PostgresDatabase.open(
        url, component="posts", migrations=PG_MIGRATIONS, max_size=2,
        application_name="posts-rpc migrate",
    )
    source = sqlite3.connect(path, isolation_level=None)
    try:
        source.execute("BEGIN IMMEDIATE")
        rows = source.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM posts ORDER BY id"  # noqa: S608 - constants
        ).fetchall()
        seq_row = source.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'posts'"
        ).fetchone()
        highest = max([int(seq_row[0]) if seq_row else 0, *(int(r[0]) for r in rows)])
        with target.transaction() as dst:
            target.lock(dst, "posts migrate")
            held = int(dst.execute("SELECT count(*) FROM posts").fetchone()[0])
            if held:
                raise TargetNotEmpty(
                    f"the database {target.path} already holds {held} posts: migrate only "
                    "into a new, empty database"
                )
            if rows:
                statement = f"COPY posts ({', '.join(_COLUMNS)}) FROM STDIN"
                with dst.raw.cursor() as cur, cur.copy(statement) as copy:
                    for row in rows:
                        copy.write_row(row)
            copied = int(dst.execute("SELECT count(*) FROM posts").fetchone()[0])
            if copied != len(rows):  # pragma: no cover - COPY either writes all or raises
                raise ValueError(f"posts: {len(rows)} rows read, {copied} written")
            if highest:
                # The next id given is highest + 1, as SQLite's AUTOINCREMENT would.
                dst.execute(
                    "SELECT setval(pg_get_serial_sequence('posts', 'id'), ?, true)", (highest,)
                )
        log.info("migrated posts: %d rows, next id %d", copied, highest + 1)
        return copied
    except sqlite3.Error as exc:
        raise DependencyUnavailable(f"the SQLite database: {storage_failure(exc)}") from exc
    finally:
        source.close()
        target.close()
