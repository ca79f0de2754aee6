"""The SQLite layer: pragmas, migrations, transactions, error mapping."""

from __future__ import annotations

import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from auth_rpc.auth.db import MIGRATIONS, SCHEMA_VERSION, Database
from auth_rpc.errors import DependencyUnavailable

EXPECTED_SCHEMA = {
    "users": ["username", "password_hash", "scopes", "created_at", "audiences", "disabled_at"],
    "clients": [
        "client_id",
        "secret_hash",
        "scopes",
        "created_at",
        "secret_digest",
        "audiences",
        "may_introspect",
        "disabled_at",
    ],
    "signing_keys": ["kid", "alg", "created_at", "superseded_at", "max_ttl_s", "activates_at",
                     "sealed_key"],
    "refresh_families": [
        "family_id",
        "subject",
        "client_id",
        "scopes",
        "created_at",
        "expires_at",
        "revoked_at",
        "audience",
    ],
    "refresh_tokens": ["token_hash", "family_id", "issued_at", "used_at"],
    "family_access_tokens": ["jti", "family_id", "expires_at", "status_list", "status_idx"],
    "revoked_tokens": ["jti", "expires_at"],
    "throttle_streaks": ["kind", "key", "failures", "last"],
    "throttle_reservations": ["kind", "key", "reservation", "expires_at"],
    "issued_access_tokens": ["status_list", "status_idx", "subject", "client_id", "expires_at"],
    "status_lists": [
        "list_id",
        "capacity",
        "allocated",
        "perm_key",
        "version",
        "last_exp",
        "created_at",
        "retired_at",
    ],
    "status_bits": ["list_id", "idx"],
}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.open(tmp_path / "t.sqlite3")
    yield database
    database.close()


def test_schema_created_and_versioned(db: Database) -> None:
    assert db.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    with db.read() as conn:
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        assert tables == set(EXPECTED_SCHEMA)
        for table, columns in EXPECTED_SCHEMA.items():
            assert [r[1] for r in conn.execute(f"PRAGMA table_info({table})")] == columns


def test_pragmas(db: Database) -> None:
    with db.read() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_file_mode(db: Database) -> None:
    assert stat.S_IMODE(db.path.stat().st_mode) == 0o600


def test_reopen_does_not_migrate_again(tmp_path: Path) -> None:
    Database.open(tmp_path / "t.sqlite3").close()
    db = Database.open(tmp_path / "t.sqlite3")
    assert db.schema_version == SCHEMA_VERSION
    db.close()


def test_a_new_migration_is_applied_to_an_old_database(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"
    db = Database.open(path)
    with db.transaction() as conn:
        conn.execute("INSERT INTO revoked_tokens (jti, expires_at) VALUES ('j', 1)")
    db.close()
    later = (*MIGRATIONS, "ALTER TABLE revoked_tokens ADD COLUMN reason TEXT NOT NULL DEFAULT '';")
    db = Database.open(path, migrations=later)
    assert db.schema_version == SCHEMA_VERSION + 1
    with db.read() as conn:
        assert conn.execute("SELECT jti, reason FROM revoked_tokens").fetchall() == [("j", "")]
    db.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"
    Database.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ValueError, match="newer"):
        Database.open(path)


def test_a_failed_migration_leaves_nothing_half_done(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"
    with pytest.raises(DependencyUnavailable):
        Database.open(path, migrations=(*MIGRATIONS, "CREATE TABLE x (a); SELECT * FROM nope;"))
    db = Database.open(path)
    with db.read() as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'x'").fetchone() is None
    assert db.schema_version == SCHEMA_VERSION
    db.close()


def test_transaction_rolls_back_on_error(db: Database) -> None:
    with pytest.raises(RuntimeError), db.transaction() as conn:
        conn.execute("INSERT INTO revoked_tokens (jti, expires_at) VALUES ('j', 1)")
        raise RuntimeError("boom")
    with db.read() as conn:
        assert conn.execute("SELECT COUNT(*) FROM revoked_tokens").fetchone()[0] == 0


def test_nested_transactions_join(db: Database) -> None:
    with db.transaction() as outer:
        outer.execute("INSERT INTO revoked_tokens (jti, expires_at) VALUES ('a', 1)")
        with db.transaction() as inner:
            inner.execute("INSERT INTO revoked_tokens (jti, expires_at) VALUES ('b', 1)")
    with db.read() as conn:
        assert conn.execute("SELECT COUNT(*) FROM revoked_tokens").fetchone()[0] == 2


def test_sqlite_errors_become_dependency_unavailable(db: Database) -> None:
    with pytest.raises(DependencyUnavailable, match="database unavailable"), db.read() as conn:
        conn.execute("SELECT * FROM no_such_table")
    with pytest.raises(DependencyUnavailable), db.transaction() as conn:
        conn.execute("INSERT INTO revoked_tokens (jti) VALUES ('j')")  # NOT NULL
    # The connection is usable afterwards.
    with db.transaction() as conn:
        conn.execute("INSERT INTO revoked_tokens (jti, expires_at) VALUES ('j', 1)")


def test_a_locked_database_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"
    db = Database.open(path, busy_timeout_s=0.05)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(DependencyUnavailable), db.transaction() as conn:
            conn.execute("INSERT INTO revoked_tokens (jti, expires_at) VALUES ('j', 1)")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert db.ping()
    db.close()


def test_closed_database(db: Database) -> None:
    db.close()
    db.close()
    assert not db.ping()
    with pytest.raises(DependencyUnavailable), db.read():
        pass


def test_unopenable_path_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DependencyUnavailable):
        Database.open(tmp_path / "missing-dir" / "t.sqlite3")


def test_concurrent_writers_from_many_threads(db: Database) -> None:
    def work(n: int) -> None:
        for i in range(50):
            with db.transaction() as conn:
                conn.execute(
                    "INSERT INTO revoked_tokens (jti, expires_at) VALUES (?, 1)", (f"{n}-{i}",)
                )

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    with db.read() as conn:
        assert conn.execute("SELECT COUNT(*) FROM revoked_tokens").fetchone()[0] == 400
