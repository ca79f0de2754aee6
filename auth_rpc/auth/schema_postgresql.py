"""The Auth schema on PostgreSQL: the same versions as the SQLite migrations.

The n-th entry brings a PostgreSQL database to schema version n, with the
tables and columns that SQLite's migration n (:data:`auth_rpc.auth.db.MIGRATIONS`)
makes, in PostgreSQL's types: ``BIGINT`` for every integer (times in seconds
and milliseconds, counters: PostgreSQL's ``INTEGER`` is 32-bit), ``BYTEA`` for
``BLOB``, ``DOUBLE PRECISION`` for ``REAL``; no ``WITHOUT ROWID``. Append a
migration here whenever one is appended there, never edit a shipped one.
"""

from __future__ import annotations

__all__ = ["PG_MIGRATIONS"]

PG_MIGRATIONS: tuple[str, ...] = (
    # 1: users, clients, signing keys, refresh token families, revocations.
    """
    CREATE TABLE users (
        username      TEXT PRIMARY KEY NOT NULL,
        password_hash TEXT NOT NULL,
        scopes        TEXT NOT NULL,
        created_at    BIGINT NOT NULL
    );
    CREATE TABLE clients (
        client_id   TEXT PRIMARY KEY NOT NULL,
        secret_hash TEXT NOT NULL,
        scopes      TEXT NOT NULL,
        created_at  BIGINT NOT NULL
    );
    CREATE TABLE signing_keys (
        kid           TEXT PRIMARY KEY NOT NULL,
        alg           TEXT NOT NULL,
        created_at    BIGINT NOT NULL,
        superseded_at BIGINT,
        max_ttl_s     BIGINT NOT NULL
    );
    CREATE TABLE refresh_families (
        family_id  TEXT PRIMARY KEY NOT NULL,
        subject    TEXT NOT NULL,
        client_id  TEXT NOT NULL,
        scopes     TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        revoked_at BIGINT
    );
    CREATE INDEX refresh_families_expires ON refresh_families (expires_at);
    CREATE INDEX refresh_families_subject ON refresh_families (subject);
    CREATE TABLE refresh_tokens (
        token_hash BYTEA PRIMARY KEY NOT NULL,
        family_id  TEXT NOT NULL REFERENCES refresh_families (family_id) ON DELETE CASCADE,
        issued_at  BIGINT NOT NULL,
        used_at    BIGINT
    );
    CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);
    CREATE TABLE family_access_tokens (
        jti        TEXT PRIMARY KEY NOT NULL,
        family_id  TEXT NOT NULL REFERENCES refresh_families (family_id) ON DELETE CASCADE,
        expires_at BIGINT NOT NULL
    );
    CREATE INDEX family_access_tokens_family ON family_access_tokens (family_id);
    CREATE TABLE revoked_tokens (
        jti        TEXT PRIMARY KEY NOT NULL,
        expires_at BIGINT NOT NULL
    );
    CREATE INDEX revoked_tokens_expires ON revoked_tokens (expires_at);
    """,
    # 2: throttling streaks, shared by every replica.
    """
    CREATE TABLE throttle_streaks (
        kind     TEXT NOT NULL,
        key      TEXT NOT NULL,
        failures BIGINT NOT NULL,
        last     DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (kind, key)
    );
    CREATE INDEX throttle_streaks_last ON throttle_streaks (last);
    """,
    # 3: a fast digest (SHA-256) of each client secret.
    """
    ALTER TABLE clients ADD COLUMN secret_digest BYTEA;
    """,
    # 4: RFC 8707 resource indicators.
    """
    ALTER TABLE users ADD COLUMN audiences TEXT;
    ALTER TABLE clients ADD COLUMN audiences TEXT;
    ALTER TABLE refresh_families ADD COLUMN audience TEXT;
    """,
    # 5: Token Status Lists.
    """
    CREATE TABLE status_lists (
        list_id    BIGINT PRIMARY KEY NOT NULL,
        capacity   BIGINT NOT NULL,
        allocated  BIGINT NOT NULL,
        perm_key   BYTEA NOT NULL,
        version    BIGINT NOT NULL,
        last_exp   BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        retired_at BIGINT
    );
    CREATE TABLE status_bits (
        list_id BIGINT NOT NULL REFERENCES status_lists (list_id),
        idx     BIGINT NOT NULL,
        PRIMARY KEY (list_id, idx)
    );
    ALTER TABLE family_access_tokens ADD COLUMN status_list BIGINT;
    ALTER TABLE family_access_tokens ADD COLUMN status_idx BIGINT;
    """,
    # 6: keys published before they sign.
    """
    ALTER TABLE signing_keys ADD COLUMN activates_at BIGINT;
    """,
    # 7: introspection is a permission a client is given.
    """
    ALTER TABLE clients ADD COLUMN may_introspect BIGINT NOT NULL DEFAULT 0;
    UPDATE clients SET may_introspect = 1
        WHERE strpos(' ' || scopes || ' ', ' introspect ') > 0;
    """,
    # 8: throttled attempts in flight, shared by every replica.
    """
    CREATE TABLE throttle_reservations (
        kind        TEXT NOT NULL,
        key         TEXT NOT NULL,
        reservation TEXT NOT NULL,
        expires_at  DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (kind, key, reservation)
    );
    CREATE INDEX throttle_reservations_expires ON throttle_reservations (expires_at);
    """,
    # 9: accounts administration (disable, enable, remove); live access tokens by account.
    """
    ALTER TABLE users ADD COLUMN disabled_at BIGINT;
    ALTER TABLE clients ADD COLUMN disabled_at BIGINT;
    CREATE TABLE issued_access_tokens (
        status_list BIGINT NOT NULL,
        status_idx  BIGINT NOT NULL,
        subject     TEXT NOT NULL,
        client_id   TEXT NOT NULL,
        expires_at  BIGINT NOT NULL,
        PRIMARY KEY (status_list, status_idx)
    );
    CREATE INDEX issued_access_tokens_subject ON issued_access_tokens (subject);
    CREATE INDEX issued_access_tokens_client ON issued_access_tokens (client_id);
    CREATE INDEX issued_access_tokens_expires ON issued_access_tokens (expires_at);
    """,
    # 10: signing keys sealed with the key-encryption key (shared by every replica).
    """
    ALTER TABLE signing_keys ADD COLUMN sealed_key BYTEA;
    """,
)
