"""Users and service clients: input rules and their SQLite store.

Usernames and client ids are case-sensitive. A new one (``add-user``,
``add-client``) must follow :data:`NAME_RULE`: 1..64 ASCII letters, digits and
``. _ @ -``, starting with a letter or a digit. Names made before that rule
keep working wherever a name is looked up (login, client credentials, the
admin commands), which accept 1..128 characters without control characters.

Passwords are 1..1024 bytes of UTF-8 wherever one is checked; a new one
(``add-user``, ``set-password``) must also pass a :class:`PasswordPolicy`
(NIST SP 800-63B section 3.1.1.2: a minimum length, 8 characters unless
configured, counted in Unicode code points; no composition rules; at most
1024 bytes, so that 64 characters and more are always allowed while one
argon2 input stays bounded; optionally not in a blocklist, compared
case-insensitively). Scopes follow RFC 6749
section 3.3 (``scope-token = 1*( %x21 / %x23-5B / %x5D-7E )``, separated by
single spaces), at most 1024 characters in all.

Audience names (the ``aud`` a user or client may ask tokens for, RFC 8707
resource indicators): 1..128 characters of ASCII letters, digits and
``. _ ~ : / -`` (RFC 3986 unreserved characters, ``:`` and ``/``, so that a
name may also be an absolute URI such as ``https://notes.example.com``),
starting with a letter or a digit; case-sensitive. At most 32 per account.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from auth_rpc.auth.changes import notify
from auth_rpc.auth.db import AnyDatabase
from auth_rpc.errors import InvalidInput
from auth_rpc.serving.sqlstore import POSTGRESQL

__all__ = [
    "NAME_RULE",
    "Account",
    "AccountStore",
    "Client",
    "PasswordPolicy",
    "User",
    "check_audience",
    "check_audiences",
    "check_client_id",
    "check_new_name",
    "check_password",
    "check_scopes",
    "check_username",
    "parse_scope",
]

log = logging.getLogger("auth_rpc.auth.accounts")

MAX_NAME_CHARS = 128
MAX_PASSWORD_BYTES = 1024
MAX_SCOPE_CHARS = 1024
MAX_AUDIENCE_CHARS = 128
MAX_AUDIENCES = 32
AUDIENCE_RULE = (
    f"1..{MAX_AUDIENCE_CHARS} characters of ASCII letters, digits and . _ ~ : / -, "
    "starting with a letter or a digit"
)
_AUDIENCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~:/-]*\Z")
MAX_NEW_NAME_CHARS = 64
NAME_RULE = (
    f"1..{MAX_NEW_NAME_CHARS} characters of ASCII letters, digits and . _ @ -, "
    "starting with a letter or a digit"
)
_NEW_NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._@-]{{0,{MAX_NEW_NAME_CHARS - 1}}}\Z")
#: NIST SP 800-63B: at least 8 characters unless configured otherwise.
DEFAULT_MIN_PASSWORD_CHARS = 8
#: The most a configured minimum may be: a 64-character password is always allowed.
MAX_MIN_PASSWORD_CHARS = 64
#: Passwords per blocklist file at most (a file of common passwords is ~1e5..1e6 lines).
MAX_BLOCKLIST_ENTRIES = 10_000_000


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


def check_new_name(value: object, field: str) -> str:
    """``value`` if it may name a new user or client (:data:`NAME_RULE`).

    Raises InvalidInput(field, ...) naming the rule.
    """
    _check_name(field, value)
    assert isinstance(value, str)
    if not _NEW_NAME_RE.match(value):
        raise InvalidInput(field, f"a name must be {NAME_RULE}")
    return value


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


@dataclass(frozen=True)
class PasswordPolicy:
    """What a new password must be (NIST SP 800-63B section 3.1.1.2).

    ``min_chars`` (default 8; 1..64) Unicode code points at least, at most
    1024 bytes of UTF-8 (:data:`MAX_PASSWORD_BYTES`: at least 256 characters,
    so 64 and more are always allowed, and an argon2 input stays bounded), no
    composition rules, and not one of ``blocklist`` (case-insensitive: the
    entries are stored case-folded). Raises ``ValueError`` for a minimum out
    of range.
    """

    min_chars: int = DEFAULT_MIN_PASSWORD_CHARS
    blocklist: frozenset[str] = field(default=frozenset(), repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.min_chars <= MAX_MIN_PASSWORD_CHARS:
            raise ValueError(
                f"the minimum password length must be 1..{MAX_MIN_PASSWORD_CHARS} characters"
            )

    @classmethod
    def with_blocklist_file(
        cls, path: Path | str, *, min_chars: int = DEFAULT_MIN_PASSWORD_CHARS
    ) -> PasswordPolicy:
        """A policy refusing the passwords listed in ``path`` (UTF-8, one per line).

        Lines lose their line ending only (spaces count); empty lines are
        skipped. Raises ``OSError`` (unreadable), ``ValueError`` (not UTF-8,
        more than 10,000,000 entries).
        """
        entries: set[str] = set()
        try:
            with open(path, encoding="utf-8", newline="") as lines:
                for line in lines:
                    entry = line.rstrip("\r\n")
                    if entry:
                        entries.add(entry.casefold())
                        if len(entries) > MAX_BLOCKLIST_ENTRIES:
                            raise ValueError(
                                f"the password blocklist {path} has more than "
                                f"{MAX_BLOCKLIST_ENTRIES} entries"
                            )
        except UnicodeDecodeError as exc:
            raise ValueError(f"the password blocklist {path} is not UTF-8 text") from exc
        return cls(min_chars=min_chars, blocklist=frozenset(entries))

    def check(self, value: object, field: str = "password") -> str:
        """``value`` if the policy accepts it; else InvalidInput(field, ...) naming the rule."""
        password = check_password(value, field)
        if len(password) < self.min_chars:
            raise InvalidInput(
                field,
                f"too short: the password policy asks for at least {self.min_chars} characters",
            )
        if self.blocklist and password.casefold() in self.blocklist:
            raise InvalidInput(
                field, "refused by the password policy: it is on the list of forbidden passwords"
            )
        return password


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


def check_audience(value: object, field: str = "audience") -> str:
    """``value`` if it is a valid audience name (see the module docstring).

    Raises InvalidInput(field, ...) naming the rule.
    """
    if (
        not isinstance(value, str)
        or len(value) > MAX_AUDIENCE_CHARS
        or not _AUDIENCE_RE.match(value)
    ):
        raise InvalidInput(field, f"an audience name must be {AUDIENCE_RULE}")
    return value


def check_audiences(
    audiences: Iterable[str] | None, field: str = "audience"
) -> tuple[str, ...] | None:
    """Valid audience names, in the order given, without repeats; ``None`` stays ``None``.

    ``None`` means "only the service's default audience". An empty list is
    refused (an account that may use no audience could never get a token), as
    is a single string (a likely mistake for a list). Raises InvalidInput.
    """
    if audiences is None:
        return None
    if isinstance(audiences, str):
        raise InvalidInput(field, "must be a list of audience names")
    names = tuple(dict.fromkeys(check_audience(a, field) for a in audiences))
    if not names:
        raise InvalidInput(field, "at least one audience, or none given for the default")
    if len(names) > MAX_AUDIENCES:
        raise InvalidInput(field, f"at most {MAX_AUDIENCES} audiences")
    return names


def _audiences_column(audiences: tuple[str, ...] | None) -> str | None:
    return None if audiences is None else " ".join(audiences)


def _audiences_of(value: object) -> tuple[str, ...] | None:
    # Fail closed: a stored value that is not a list of valid names allows nothing.
    if value is None:
        return None
    if not isinstance(value, str):
        return ()
    return tuple(a for a in value.split(" ") if _AUDIENCE_RE.match(a))


@dataclass(frozen=True)
class User:
    username: str
    password_hash: str
    scopes: tuple[str, ...]
    #: The audiences the user may ask tokens for; ``None``: the service's default only.
    audiences: tuple[str, ...] | None = None
    #: Disabled (``auth-rpc disable``): no login, no refresh.
    disabled: bool = False


@dataclass(frozen=True)
class Client:
    client_id: str
    secret_hash: str
    scopes: tuple[str, ...]
    #: SHA-256 of the secret (see :func:`client_secret_digest`); ``None`` for a
    #: client registered before digests were stored, until it next authenticates.
    secret_digest: bytes | None = None
    #: The audiences the client may ask tokens for; ``None``: the service's default only.
    audiences: tuple[str, ...] | None = None
    #: Whether the client may introspect tokens (``POST /introspect``): a
    #: permission given at registration (``add-client --introspect``), not a scope.
    may_introspect: bool = False
    #: Disabled (``auth-rpc disable``): its credentials are refused.
    disabled: bool = False


@dataclass(frozen=True)
class Account:
    """A user or a client as ``auth-rpc list`` shows it."""

    name: str
    kind: str  # "user" | "client"
    scopes: tuple[str, ...]
    audiences: tuple[str, ...] | None
    created_at: int
    disabled_at: int | None
    may_introspect: bool = False


def client_secret_digest(secret: str) -> bytes:
    """The stored digest of a client secret.

    A plain SHA-256 is enough, and is what makes client authentication cheap:
    client secrets are 256 random bits chosen by the service (never by a
    person), so no dictionary or brute force applies, unlike passwords.
    """
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


#: kind -> (table, key column): constants, never input.
_TABLES = {"user": ("users", "username"), "client": ("clients", "client_id")}


class AccountStore:
    """The ``users`` and ``clients`` tables. Every method may raise DependencyUnavailable."""

    def __init__(self, db: AnyDatabase) -> None:
        self._db = db

    def get_user(self, username: str) -> User | None:
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT username, password_hash, scopes, audiences, disabled_at FROM users "
                "WHERE username = ?",
                (username,),
            ).fetchone()
        if row is None:
            return None
        return User(
            row[0], row[1], tuple(row[2].split()), _audiences_of(row[3]),
            disabled=row[4] is not None,
        )

    def add_user(
        self,
        username: str,
        password_hash: str,
        scopes: tuple[str, ...],
        *,
        now: int,
        audiences: tuple[str, ...] | None = None,
    ) -> None:
        """Create a user. Raises InvalidInput("username", ...) if it exists."""
        with self._db.transaction() as conn:
            try:
                conn.execute(
                    "INSERT INTO users (username, password_hash, scopes, created_at, audiences) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (username, password_hash, " ".join(scopes), now, _audiences_column(audiences)),
                )
            except self._db.IntegrityError as exc:
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
                "SELECT client_id, secret_hash, scopes, secret_digest, audiences, "
                "may_introspect, disabled_at FROM clients WHERE client_id = ?",
                (client_id,),
            ).fetchone()
        if row is None:
            return None
        digest = bytes(row[3]) if row[3] is not None else None
        return Client(
            row[0], row[1], tuple(row[2].split()), digest, _audiences_of(row[4]),
            may_introspect=row[5] == 1,  # fail closed: anything but 1 is no
            disabled=row[6] is not None,
        )

    def add_client(
        self,
        client_id: str,
        secret_hash: str,
        scopes: tuple[str, ...],
        *,
        now: int,
        secret_digest: bytes | None = None,
        audiences: tuple[str, ...] | None = None,
        may_introspect: bool = False,
    ) -> None:
        """Register a client. Raises InvalidInput("client_id", ...) if it exists."""
        with self._db.transaction() as conn:
            try:
                conn.execute(
                    "INSERT INTO clients (client_id, secret_hash, scopes, created_at, "
                    "secret_digest, audiences, may_introspect) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        client_id,
                        secret_hash,
                        " ".join(scopes),
                        now,
                        secret_digest,
                        _audiences_column(audiences),
                        1 if may_introspect else 0,
                    ),
                )
            except self._db.IntegrityError as exc:
                raise InvalidInput("client_id", "already exists") from exc

    def set_client_digest(self, client_id: str, secret_hash: str, digest: bytes) -> None:
        """Store the digest of a client registered before digests, unless its secret changed."""
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE clients SET secret_digest = ? "
                "WHERE client_id = ? AND secret_hash = ? AND secret_digest IS NULL",
                (digest, client_id, secret_hash),
            )

    # -- administration (auth-rpc list, disable, enable, remove, set-*) -----

    def kind_of(self, name: str) -> str | None:
        """``"user"``, ``"client"`` or ``None``: what ``name`` names (names are unique)."""
        with self._db.read() as conn:
            if conn.execute("SELECT 1 FROM users WHERE username = ?", (name,)).fetchone():
                return "user"
            if conn.execute("SELECT 1 FROM clients WHERE client_id = ?", (name,)).fetchone():
                return "client"
        return None

    def is_active(self, kind: str, name: str) -> bool:
        """Whether the user or client ``name`` exists and is enabled.

        Asked again inside the transaction that issues a token, so that a
        ``disable`` committed by another process is never outrun.
        """
        table, column = _TABLES[kind]
        with self._db.read() as conn:
            row = conn.execute(
                f"SELECT disabled_at FROM {table} WHERE {column} = ?",  # noqa: S608 - constants
                (name,),
            ).fetchone()
        return row is not None and row[0] is None

    def accounts(self) -> list[Account]:
        """Every user and client, users first, each by name."""
        with self._db.read() as conn:
            users = conn.execute(
                "SELECT username, scopes, audiences, created_at, disabled_at FROM users "
                "ORDER BY username"
            ).fetchall()
            clients = conn.execute(
                "SELECT client_id, scopes, audiences, created_at, disabled_at, may_introspect "
                "FROM clients ORDER BY client_id"
            ).fetchall()
        found = [
            Account(r[0], "user", tuple(r[1].split()), _audiences_of(r[2]), int(r[3]), r[4])
            for r in users
        ]
        found += [
            Account(
                r[0], "client", tuple(r[1].split()), _audiences_of(r[2]), int(r[3]), r[4],
                may_introspect=r[5] == 1,
            )
            for r in clients
        ]
        return found

    def set_disabled(self, kind: str, name: str, disabled_at: int | None) -> bool:
        """Disable (at ``disabled_at``) or enable (``None``) an account; ``False`` if unknown.

        Runs in the caller's transaction when there is one.
        """
        table, column = _TABLES[kind]
        with self._db.transaction() as conn:
            cur = conn.execute(
                f"UPDATE {table} SET disabled_at = ? WHERE {column} = ?",  # noqa: S608 - constants
                (disabled_at, name),
            )
            notify(self._db, conn, kind, name)
        return cur.rowcount == 1

    def delete(self, kind: str, name: str) -> bool:
        """Delete an account; ``False`` if unknown. Runs in the caller's transaction if any."""
        table, column = _TABLES[kind]
        with self._db.transaction() as conn:
            cur = conn.execute(
                f"DELETE FROM {table} WHERE {column} = ?", (name,)  # noqa: S608 - constants
            )
            notify(self._db, conn, kind, name)
        return cur.rowcount == 1

    def replace_password_hash(self, username: str, password_hash: str) -> bool:
        """Set a user's password hash (``set-password``); ``False`` if unknown."""
        with self._db.transaction() as conn:
            cur = conn.execute(
                "UPDATE users SET password_hash = ? WHERE username = ?", (password_hash, username)
            )
            notify(self._db, conn, "user", username)
        return cur.rowcount == 1

    def replace_client_secret(self, client_id: str, secret_hash: str, digest: bytes) -> bool:
        """Set a client's secret (hash and digest; ``reset-secret``); ``False`` if unknown."""
        with self._db.transaction() as conn:
            cur = conn.execute(
                "UPDATE clients SET secret_hash = ?, secret_digest = ? WHERE client_id = ?",
                (secret_hash, digest, client_id),
            )
            notify(self._db, conn, "client", client_id)
        return cur.rowcount == 1

    def set_scopes(self, kind: str, name: str, scopes: tuple[str, ...]) -> bool:
        """Replace an account's scopes; ``False`` if unknown."""
        table, column = _TABLES[kind]
        with self._db.transaction() as conn:
            cur = conn.execute(
                f"UPDATE {table} SET scopes = ? WHERE {column} = ?",  # noqa: S608 - constants
                (" ".join(scopes), name),
            )
            notify(self._db, conn, kind, name)
        return cur.rowcount == 1

    def set_audiences(self, kind: str, name: str, audiences: tuple[str, ...] | None) -> bool:
        """Replace an account's audiences (``None``: the default only); ``False`` if unknown."""
        table, column = _TABLES[kind]
        with self._db.transaction() as conn:
            cur = conn.execute(
                f"UPDATE {table} SET audiences = ? WHERE {column} = ?",  # noqa: S608 - constants
                (_audiences_column(audiences), name),
            )
            notify(self._db, conn, kind, name)
        return cur.rowcount == 1

    def audience_in_use(self, audience: str) -> bool:
        """Whether some user or client may ask tokens for ``audience`` (listed by name).

        A scan of both tables: the Auth service asks only about an audience it
        has not seen yet, of a token signed by its own key.
        """
        find = "strpos" if self._db.dialect == POSTGRESQL else "instr"
        listed = f"audiences IS NOT NULL AND {find}(' ' || audiences || ' ', ' ' || ? || ' ') > 0"
        with self._db.read() as conn:
            row = conn.execute(
                f"SELECT 1 FROM users WHERE {listed} "  # noqa: S608 - a constant, no input
                f"UNION ALL SELECT 1 FROM clients WHERE {listed} LIMIT 1",
                (audience, audience),
            ).fetchone()
        return row is not None
