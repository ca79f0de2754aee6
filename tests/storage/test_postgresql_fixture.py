"""The shipped PostgreSQL fixtures: a real server, a fresh database per test."""

from __future__ import annotations

import os

import psycopg


def test_server_starts_on_a_unix_socket_only(postgresql_server):
    print(f"initdb to ready: {postgresql_server.startup_s:.2f} s")
    assert postgresql_server.startup_s < 60
    with psycopg.connect(postgresql_server.url()) as conn:
        listen = conn.execute("SHOW listen_addresses").fetchone()[0]
        assert listen == ""
        assert conn.execute("SELECT current_user").fetchone()[0] == "postgres"
    socket = postgresql_server.socket_dir / ".s.PGSQL.5432"
    assert socket.exists()
    # PostgreSQL refuses root: the server runs as an unprivileged user.
    assert postgresql_server.data_dir.stat().st_uid != 0 or os.geteuid() != 0


def test_each_test_gets_a_fresh_database(postgresql_url):
    assert "?host=/" in postgresql_url
    with psycopg.connect(postgresql_url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()[0]
        assert tables == 0
        conn.execute("CREATE TABLE t (x BIGINT)")
        conn.execute("INSERT INTO t VALUES (1)")


def test_a_second_database_is_fresh_too(postgresql_url):
    with psycopg.connect(postgresql_url) as conn:
        assert conn.execute("SELECT to_regclass('public.t')").fetchone()[0] is None


def test_databases_are_dropped(postgresql_server):
    url = postgresql_server.create_database()
    name = url.rsplit("/", 1)[1].split("?")[0]
    postgresql_server.drop_database(name)
    with psycopg.connect(postgresql_server.url()) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        assert found is None
