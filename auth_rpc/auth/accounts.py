"""Users and service clients: input rules and their SQLite store.

Usernames and client ids are case-sensitive, 1..128 characters, no control
characters. Passwords are 1..1024 bytes of UTF-8. Scopes follow RFC 6749
section 3.3 (``scope-token = 1*( %x21 / %x23-5B / %x5D-7E )``, separated by
single spaces), at most 1024 characters in all.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from auth_rpc.auth.db import Database
from auth_rpc.errors import InvalidInput

__all__ = [
    "AccountStore",
    "Client",
    "User",
    "check_client_id",
    "check_password",
    "check_scopes",
    "check_username",
    "parse_scope",
]

log = logging.getLogger("auth_rpc.auth.accounts")

MAX_NAME_CHARS = 128
MAX_PASSWORD_BYTES = 1024
MAX_SCOPE_CHARS = 1024


def _check_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(field, "must not be empty")
    if len(value) > MAX_NAME_CHARS:
        raise InvalidInput(field, f"at most {MAX_NAME_CHARS} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") for ch in value):
        raise InvalidInput(field, "must not contain control characters")
    if value != value.strip():
        raise InvalidInput(field, "must not start or end with white space")
    return value


def check_username(value: object) -> str:
    """``value`` if it is a valid username. Raises InvalidInput("username", ...)."""
    return _check_name("username", value)


def check_client_id(value: object) -> str:
    """``value`` if it is a valid client id. Raises InvalidInput("client_id", ...)."""
    return _check_name("client_id", value)


def check_password(value: object, field: str = "password") -> str:
    """``value`` if it is 1..1024 bytes of UTF-8. Raises InvalidInput(field, ...)."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(field, "must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidInput(field, "must be valid UTF-8") from exc
    if size > MAX_PASSWORD_BYTES:
        raise InvalidInput(field, f"at most {MAX_PASSWORD_BYTES} bytes")
    return value


def _scope_token_ok(token: str) -> bool:
    return bool(token) and all(
        ch == "\x21" or "\x23" <= ch <= "\x5b" or "\x5d" <= ch <= "\x7e" for ch in token
    )


def parse_scope(value: object, field: str = "scope") -> tuple[str, ...]:
    """The scope tokens of a space-separated scope string, sorted, without repeats.

    ``""`` gives ``()``. Raises InvalidInput(field, ...) for anything but
    RFC 6749 scope tokens separated by spaces, or over 1024 characters.
    """
    if value is None:
        return ()
    if not isinstance(value, str):
        raise InvalidInput(field, "must be a string")
    if len(value) > MAX_SCOPE_CHARS:
        raise InvalidInput(field, f"at most {MAX_SCOPE_CHARS} characters")
    tokens = value.split(" ")
    if value and not all(_scope_token_ok(t) for t in tokens):
        raise InvalidInput(field, "must be printable scope tokens separated by single spaces")
    return tuple(sorted(set(t for t in tokens if t)))


def check_scopes(scopes: Iterable[str] | str, field: str = "scope") -> tuple[str, ...]:
    """Like :func:`parse_scope` for a list of scope tokens (or one string)."""
    if isinstance(scopes, str):
        return parse_scope(scopes, field)
    items = list(scopes)
    if not all(isinstance(s, str) and _scope_token_ok(s) for s in items):
        raise InvalidInput(field, "each scope must be one printable scope token")
    return parse_scope(" ".join(items), field)


@dataclass(frozen=True)
class User:
    username: str
    password_hash: str
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class Client:
    client_id: str
    secret_hash: str
    scopes: tuple[str, ...]
    #: SHA-256 of the secret (see :func:`client_secret_digest`); ``None`` for a
    #: client registered before digests were stored, until it next authenticates.
    secret_digest: bytes | None = None


def client_secret_digest(secret: str) -> bytes:
    """The stored digest of a client secret.

    A plain SHA-256 is enough, and is what makes client authentication cheap:
    client secrets are 256 random bits chosen by the service (never by a
    person), so no dictionary or brute force applies, unlike passwords.
    """
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class AccountStore:
    """The ``users`` and ``clients`` tables. Every method may raise DependencyUnavailable."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def get_user(self, username: str) -> User | None:
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT username, password_hash, scopes FROM users WHERE username = ?", (username,)
            ).fetchone()
        return None if row is None else User(row[0], row[1], tuple(row[2].split()))

    def add_user(
        self, username: str, password_hash: str, scopes: tuple[str, ...], *, now: int
    ) -> None:
        """Create a user. Raises InvalidInput("username", ...) if it exists."""
        with self._db.transaction() as conn:
            try:
                conn.execute(
                    "INSERT INTO users (username, password_hash, scopes, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (username, password_hash, " ".join(scopes), now),
                )
            except sqlite3.IntegrityError as exc:
                raise InvalidInput("username", "already exists") from exc

    def set_password_hash(self, username: str, old_hash: str, new_hash: str) -> None:
        """Replace a user's hash (rehash on login) unless it changed meanwhile."""
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE users SET password_hash = ? WHERE username = ? AND password_hash = ?",
                (new_hash, username, old_hash),
            )

    def get_client(self, client_id: str) -> Client | None:
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT client_id, secret_hash, scopes, secret_digest FROM clients "
                "WHERE client_id = ?",
                (client_id,),
            ).fetchone()
        if row is None:
            return None
        digest = bytes(row[3]) if row[3] is not None else None
        return Client(row[0], row[1], tuple(row[2].split()), digest)

    def add_client(
        self,
        client_id: str,
        secret_hash: str,
        scopes: tuple[str, ...],
        *,
        now: int,
        secret_digest: bytes | None = None,
    ) -> None:
        """Register a client. Raises InvalidInput("client_id", ...) if it exists."""
        with self._db.transaction() as conn:
            try:
                conn.execute(
                    "INSERT INTO clients (client_id, secret_hash, scopes, created_at, "
                    "secret_digest) VALUES (?, ?, ?, ?, ?)",
                    (client_id, secret_hash, " ".join(scopes), now, secret_digest),
                )
            except sqlite3.IntegrityError as exc:
                raise InvalidInput("client_id", "already exists") from exc

    def set_client_digest(self, client_id: str, secret_hash: str, digest: bytes) -> None:
        """Store the digest of a client registered before digests, unless its secret changed."""
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE clients SET secret_digest = ? "
                "WHERE client_id = ? AND secret_hash = ? AND secret_digest IS NULL",
                (digest, client_id, secret_hash),
            )
