"""``auth-rpc migrate``: move a SQLite data directory's Auth state to PostgreSQL.

Everything that makes issued tokens and sessions keep working is copied, as
it is: users and clients (password and secret hashes), the signing keys (each
key file sealed into its row with the key-encryption key), refresh token
families and tokens (refresh tokens issued before keep refreshing, a reused
one is still detected), revocations (by ``jti``), the Token Status Lists and
their bits (revoked access tokens stay revoked, the lists keep their ids and
versions), the record of issued access tokens (``disable`` still revokes
them), and the login throttling streaks. Not copied: attempts in flight
(``throttle_reservations``: they end within seconds).

The copy is one transaction on each side: the SQLite database is read under
``BEGIN IMMEDIATE`` (no writer can change it meanwhile: stop ``auth-rpc
serve`` first anyway), PostgreSQL is written in one transaction with ``COPY``
and the row counts are compared before it commits; on any failure nothing is
left in PostgreSQL but the empty schema. A target that already holds Auth data
is refused. A table of the source that this program does not know (a newer
schema) is refused rather than left behind. The SQLite data directory is not
changed (beyond bringing its schema to this version) and stays a backup.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auth_rpc.auth.changes import notify
from auth_rpc.auth.db import Database
from auth_rpc.auth.keys import KeyRecord, KeyStore
from auth_rpc.auth.schema_postgresql import PG_MIGRATIONS
from auth_rpc.auth.sealing import KEK_NEEDED, KeyEncryptionKeyError, KeySealer
from auth_rpc.serving.sqlstore import PostgresDatabase

__all__ = ["MIGRATED_TABLES", "Migration", "migrate_to_postgresql"]

log = logging.getLogger("auth_rpc.auth.migrate")

#: In an order the foreign keys allow.
MIGRATED_TABLES = (
    "users",
    "clients",
    "signing_keys",
    "refresh_families",
    "refresh_tokens",
    "family_access_tokens",
    "revoked_tokens",
    "throttle_streaks",
    "status_lists",
    "status_bits",
    "issued_access_tokens",
)
#: Left behind on purpose (see the module docstring).
SKIPPED_TABLES = ("throttle_reservations",)


class TargetNotEmpty(ValueError):
    """The PostgreSQL database already holds Auth data."""


@dataclass(frozen=True)
class Migration:
    """What was copied: rows per table, and the id of the KEK that sealed the keys."""

    rows: dict[str, int]
    kek_id: str | None


def migrate_to_postgresql(
    data_dir: Path, database_url: str, *, sealer: KeySealer | None
) -> Migration:
    """Copy the Auth state of ``data_dir`` (SQLite) into the empty database at ``database_url``.

    Raises ``ValueError`` (TargetNotEmpty, an unknown table, no SQLite
    database in ``data_dir``), KeyEncryptionKeyError (keys to seal and no
    KEK), DependencyUnavailable (either database, a key file that is
    missing, unsafe or not its kid's), ``OSError``.
    """
    from auth_rpc.auth.db import NewDatabaseRefused
    from auth_rpc.auth.service import DB_FILENAME

    path = Path(data_dir) / DB_FILENAME
    if not path.is_file():
        raise ValueError(f"no Auth database to migrate: {path} is missing")
    try:
        source = Database.open(path, allow_new=False)
    except NewDatabaseRefused:
        raise ValueError(f"no Auth database to migrate: {path} is missing or empty") from None
    try:
        target = PostgresDatabase.open(
            database_url, component="auth", migrations=PG_MIGRATIONS, application_name="auth-rpc"
        )
        try:
            return _copy(source, target, KeyStore(source, Path(data_dir) / "keys"), sealer)
        finally:
            target.close()
    finally:
        source.close()


def _copy(
    source: Database, target: PostgresDatabase, keys: KeyStore, sealer: KeySealer | None
) -> Migration:
    counted: dict[str, int] = {}
    with source.transaction() as src, target.transaction() as dst:
        target.lock(dst, "auth migrate")
        held = {
            table: int(dst.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608 - constants
            for table in (*MIGRATED_TABLES, *SKIPPED_TABLES)
        }
        if any(held.values()):
            shown = ", ".join(f"{t}: {n}" for t, n in held.items() if n)
            raise TargetNotEmpty(
                f"the database {target.path} already holds Auth data ({shown}): migrate "
                "only into a new, empty database"
            )
        tables = {
            str(r[0]) for r in src.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        }
        unknown = tables - set(MIGRATED_TABLES) - set(SKIPPED_TABLES)
        if unknown:
            raise ValueError(
                f"the SQLite database has tables this program does not know "
                f"({', '.join(sorted(unknown))}): upgrade auth-rpc before migrating"
            )
        for table in MIGRATED_TABLES:
            columns = _common_columns(src, dst, table)
            rows: list[Any] = src.execute(
                f"SELECT {', '.join(columns)} FROM {table}"  # noqa: S608 - known names
            ).fetchall()
            if table == "signing_keys":
                columns, rows = _sealed_keys(columns, rows, keys, sealer)
            _copy_rows(dst.raw, table, columns, rows)
            copied = int(dst.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608
            if copied != len(rows):  # pragma: no cover - COPY either writes all or raises
                raise ValueError(f"{table}: {len(rows)} rows read, {copied} written")
            counted[table] = copied
            log.info("migrated %s: %d rows", table, copied)
        # Replicas already running on this database (there should be none) reload.
        notify(target, dst, "keys")
    return Migration(counted, sealer.kek_id.hex() if sealer and counted["signing_keys"] else None)


def _common_columns(src: Any, dst: Any, table: str) -> list[str]:
    theirs = [str(r[1]) for r in src.execute(f"PRAGMA table_info({table})")]
    ours = {
        str(r[0]) for r in dst.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?",
            (table,),
        )
    }
    missing = [c for c in theirs if c not in ours]
    if missing:
        raise ValueError(
            f"the SQLite table {table} has columns PostgreSQL's lacks ({', '.join(missing)})"
        )
    return [c for c in theirs if c != "sealed_key"] if table == "signing_keys" else theirs


def _sealed_keys(
    columns: list[str], rows: list[Any], keys: KeyStore, sealer: KeySealer | None
) -> tuple[list[str], list[Any]]:
    """The key rows with each key file sealed into ``sealed_key``."""
    if rows and sealer is None:
        raise KeyEncryptionKeyError(KEK_NEEDED)
    names = {name: i for i, name in enumerate(columns)}
    sealed_rows = []
    for row in rows:
        record = KeyRecord(
            kid=row[names["kid"]],
            alg=row[names["alg"]],
            created_at=row[names["created_at"]],
            superseded_at=row[names["superseded_at"]],
            max_ttl_s=row[names["max_ttl_s"]],
            activates_at=row[names["activates_at"]],
        )
        key = keys.load(record)  # file checks: owner, mode, kid = thumbprint
        assert sealer is not None
        sealed_rows.append((*row, sealer.seal(record.kid, record.alg, key.private_der())))
    return [*columns, "sealed_key"], sealed_rows


def _copy_rows(raw: Any, table: str, columns: list[str], rows: list[Any]) -> None:
    if not rows:
        return
    statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
    with raw.cursor() as cur, cur.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)
