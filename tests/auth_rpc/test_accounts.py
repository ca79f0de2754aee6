"""Input rules for names, passwords and scopes; the account store."""

from __future__ import annotations

from pathlib import Path

import pytest

from auth_rpc.auth.accounts import (
    AccountStore,
    check_client_id,
    check_password,
    check_scopes,
    check_username,
    parse_scope,
)
from auth_rpc.auth.db import Database
from auth_rpc.errors import InvalidInput


@pytest.mark.parametrize("name", ["a", "alice", "a" * 128, "émile", "a.b@example.org", "a b"])
def test_valid_names(name: str) -> None:
    assert check_username(name) == name
    assert check_client_id(name) == name


@pytest.mark.parametrize(
    "name", ["", "a" * 129, "a\x00b", "a\nb", "a\u200bb", " a", "a ", None, 7, b"alice"]
)
def test_invalid_names(name: object) -> None:
    with pytest.raises(InvalidInput) as info:
        check_username(name)
    assert info.value.field == "username"
    with pytest.raises(InvalidInput) as info:
        check_client_id(name)
    assert info.value.field == "client_id"


@pytest.mark.parametrize("password", ["x", "x" * 1024, "é" * 512, " spaces around "])
def test_valid_passwords(password: str) -> None:
    assert check_password(password) == password


@pytest.mark.parametrize("password", ["", "x" * 1025, "é" * 513, "\udcff", None])
def test_invalid_passwords(password: object) -> None:
    with pytest.raises(InvalidInput) as info:
        check_password(password)
    assert info.value.field == "password"


@pytest.mark.parametrize(
    ("scope", "parsed"),
    [
        ("", ()),
        (None, ()),
        ("posts:read", ("posts:read",)),
        ("posts:write posts:read posts:read", ("posts:read", "posts:write")),
        ("a!#[]~", ("a!#[]~",)),
    ],
)
def test_valid_scopes(scope: str | None, parsed: tuple[str, ...]) -> None:
    assert parse_scope(scope) == parsed


@pytest.mark.parametrize(
    "scope", ["a  b", " a", "a ", 'a"b', "a\\b", "a\tb", "é", "a" * 1025, 5, "a\x7fb"]
)
def test_invalid_scopes(scope: object) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_scope(scope)
    assert info.value.field == "scope"


def test_check_scopes_lists() -> None:
    assert check_scopes(["b", "a", "a"]) == ("a", "b")
    assert check_scopes("b a") == ("a", "b")
    for bad in (["a b"], [""], [5]):
        with pytest.raises(InvalidInput):
            check_scopes(bad)  # type: ignore[arg-type]


def test_store(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "t.sqlite3")
    try:
        store = AccountStore(db)
        assert store.get_user("alice") is None
        store.add_user("alice", "h1", ("posts:read",), now=1)
        user = store.get_user("alice")
        assert user is not None and user.scopes == ("posts:read",)
        assert store.get_user("Alice") is None  # case-sensitive
        with pytest.raises(InvalidInput):
            store.add_user("alice", "h2", (), now=2)
        store.set_password_hash("alice", "stale", "h3")  # changed meanwhile: no-op
        assert store.get_user("alice").password_hash == "h1"  # type: ignore[union-attr]
        store.set_password_hash("alice", "h1", "h3")
        assert store.get_user("alice").password_hash == "h3"  # type: ignore[union-attr]
        store.add_client("svc", "c1", (), now=1)
        client = store.get_client("svc")
        assert client is not None and client.scopes == ()
        with pytest.raises(InvalidInput):
            store.add_client("svc", "c2", (), now=2)
    finally:
        db.close()
