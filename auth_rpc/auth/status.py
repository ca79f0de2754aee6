"""The Auth service's Token Status Lists (draft-ietf-oauth-status-list).

Every access token the service issues is a Referenced Token: its ``status``
claim names an entry of a Status List, ``{"status_list": {"idx": N, "uri":
"<base>/statuslists/<k>"}}`` (``base`` is the issuer unless configured). A
revocation of any kind sets the entry's bit, in the transaction that records
it, and the list served at ``uri`` shows it at the next request.

- :class:`StatusListStore` (SQL): allocates entries in the transaction that
  issues the token (``BEGIN IMMEDIATE``: one writer at a time across every
  process on the database, so an index is never given twice), sets bits,
  reads lists and retires them. A list holds ``capacity`` entries; a new one
  is started when it is full. The n-th index of a list is a keyed permutation
  of n (:func:`permute`): indices are not sequential (the draft's privacy
  advice) yet never repeat. A full list whose tokens have all expired is
  retired: its bits are deleted and it is no longer served (404).
- :class:`StatusListPublisher`: the Status List Token of a list, a JWT with
  header ``typ: statuslist+jwt`` and ``kid``, signed by the current signing key,
  claims ``iss``, ``sub`` (the list's uri), ``iat``, ``exp``, ``ttl`` and
  ``status_list`` (``bits`` 1, ``lst``). It is encoded lazily, once per list
  version (every bit set makes a new version), and again when half its
  lifetime has passed or the signing key changed; each encoding has an
  ``ETag`` and a gzip body.

One source of truth: ``validate``/``introspect`` read the same bits the lists
are encoded from (tokens issued before the lists existed are revoked by
``jti`` in ``revoked_tokens``, as before).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import logging
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from auth_rpc.auth.db import AnyDatabase, Connection, on_postgresql
from auth_rpc.auth.keys import SigningKey
from auth_rpc.errors import NotFoundError, TokenRejected
from auth_rpc.verify.statuslist import (
    STATUS_LIST_PATH,
    STATUS_LIST_TYP,
    StatusList,
    parse_status_claim,
)

__all__ = [
    "DEFAULT_STATUS_LIST_SIZE",
    "StatusEntry",
    "StatusListPublisher",
    "StatusListStore",
    "StatusListToken",
    "permute",
]

log = logging.getLogger("auth_rpc.auth.status")

#: Entries per list unless configured (125,000 bytes uncompressed).
DEFAULT_STATUS_LIST_SIZE = 1_000_000
_LIST_ID = re.compile(r"[1-9][0-9]{0,17}")


@dataclass(frozen=True)
class StatusEntry:
    """A token's entry: index ``idx`` of list ``list_id``."""

    list_id: int
    idx: int


def permute(n: int, capacity: int, key: bytes) -> int:
    """The ``n``-th index of a list of ``capacity`` entries (a keyed permutation of them).

    A 4-round Feistel network on the smallest even number of bits covering
    ``capacity``, cycle-walked back into range: a bijection, so distinct
    ``n`` never share an index, and without the key the order looks random.
    """
    if not 0 <= n < capacity:
        raise ValueError("n outside the list")
    half = max(1, ((capacity - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    x = n
    while True:
        left, right = x >> half, x & mask
        for round_no in range(4):
            digest = hmac.digest(key, bytes((round_no,)) + right.to_bytes(8, "big"), "sha256")
            left, right = right, left ^ (int.from_bytes(digest[:8], "big") & mask)
        x = (left << half) | right
        if x < capacity:
            return x


class StatusListStore:
    """Status lists and their set bits in the database (schema v5)."""

    def __init__(self, db: AnyDatabase, *, capacity: int = DEFAULT_STATUS_LIST_SIZE) -> None:
        if capacity < 8 or capacity % 8:
            raise ValueError("a status list's size must be a positive multiple of 8")
        self._db = db
        self.capacity = capacity

    def allocate(self, *, expires_at: int, now: int) -> StatusEntry:
        """A fresh entry for a token expiring at ``expires_at``.

        Runs in the caller's transaction when there is one (the transaction
        that issues the token), else in its own. Raises DependencyUnavailable.
        """
        with self._db.transaction() as conn:
            # On PostgreSQL replicas allocate at once: one at a time (on SQLite
            # BEGIN IMMEDIATE does it), so that a new list is started once.
            self._db.lock(conn, "status_lists")
            row = conn.execute(
                "SELECT list_id, capacity, allocated, perm_key FROM status_lists "
                "WHERE retired_at IS NULL ORDER BY list_id DESC LIMIT 1"
            ).fetchone()
            if row is None or row[2] >= row[1]:
                list_id = int(
                    conn.execute("SELECT COALESCE(MAX(list_id), 0) + 1 FROM status_lists")
                    .fetchone()[0]
                )
                row = (list_id, self.capacity, 0, secrets.token_bytes(16))
                conn.execute(
                    "INSERT INTO status_lists (list_id, capacity, allocated, perm_key, version, "
                    "last_exp, created_at, retired_at) VALUES (?, ?, 0, ?, 0, 0, ?, NULL)",
                    (list_id, self.capacity, row[3], now),
                )
                log.info("status list %d started (%d entries)", list_id, self.capacity)
            list_id, capacity, allocated, key = row
            larger = "GREATEST" if on_postgresql(conn) else "MAX"
            conn.execute(
                f"UPDATE status_lists SET allocated = allocated + 1, "  # noqa: S608 - constant
                f"last_exp = {larger}(last_exp, ?) WHERE list_id = ?",
                (expires_at, list_id),
            )
        return StatusEntry(int(list_id), permute(int(allocated), int(capacity), bytes(key)))

    def revoke(self, entry: StatusEntry) -> bool:
        """Set ``entry``'s bit (idempotent); ``False`` if the list has no such live entry."""
        with self._db.transaction() as conn:
            return self.set_bits(conn, [entry]) >= 0

    @staticmethod
    def set_bits(conn: Connection, entries: list[StatusEntry]) -> int:
        """Set the bits of ``entries`` inside the caller's transaction; how many were new.

        Entries of unknown or retired lists, or outside a list, are skipped
        (-1 when none was valid).
        """
        new, valid = 0, False
        for entry in entries:
            row = conn.execute(
                "SELECT capacity FROM status_lists WHERE list_id = ? AND retired_at IS NULL",
                (entry.list_id,),
            ).fetchone()
            if row is None or not 0 <= entry.idx < row[0]:
                continue
            valid = True
            cur = conn.execute(
                _insert_or_ignore(conn, "INTO status_bits (list_id, idx) VALUES (?, ?)"),
                (entry.list_id, entry.idx),
            )
            if cur.rowcount:
                new += 1
                conn.execute(
                    "UPDATE status_lists SET version = version + 1 WHERE list_id = ?",
                    (entry.list_id,),
                )
        return new if valid else -1

    @staticmethod
    def revoke_family(conn: Connection, family_id: str, *, now: int, leeway_s: int) -> None:
        """Set the bits of a family's unexpired access tokens, inside the caller's transaction."""
        conn.execute(
            _insert_or_ignore(
                conn,
                "INTO status_bits (list_id, idx) "
                "SELECT f.status_list, f.status_idx FROM family_access_tokens f "
                "JOIN status_lists l ON l.list_id = f.status_list AND l.retired_at IS NULL "
                "WHERE f.family_id = ? AND f.status_list IS NOT NULL AND f.expires_at + ? > ?",
            ),
            (family_id, leeway_s, now),
        )
        conn.execute(
            "UPDATE status_lists SET version = version + 1 WHERE retired_at IS NULL AND list_id IN "
            "(SELECT status_list FROM family_access_tokens "
            "WHERE family_id = ? AND status_list IS NOT NULL)",
            (family_id,),
        )

    def is_set(self, entry: StatusEntry) -> bool | None:
        """Whether ``entry``'s bit is set; ``None``: no such live entry. DependencyUnavailable."""
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT capacity, (SELECT 1 FROM status_bits WHERE list_id = ? AND idx = ?) "
                "FROM status_lists WHERE list_id = ? AND retired_at IS NULL",
                (entry.list_id, entry.idx, entry.list_id),
            ).fetchone()
        if row is None or not 0 <= entry.idx < row[0]:
            return None
        return row[1] is not None

    def version(self, list_id: int) -> tuple[int, int] | None:
        """``(capacity, version)`` of a live list, else ``None``. DependencyUnavailable."""
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT capacity, version FROM status_lists "
                "WHERE list_id = ? AND retired_at IS NULL",
                (list_id,),
            ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def set_indices(self, list_id: int) -> list[int]:
        """The indices whose bit is set in list ``list_id``. DependencyUnavailable."""
        with self._db.read() as conn:
            return [
                r[0]
                for r in conn.execute("SELECT idx FROM status_bits WHERE list_id = ?", (list_id,))
            ]

    def live(self) -> list[int]:
        """The ids of the lists not retired, oldest first. DependencyUnavailable."""
        with self._db.read() as conn:
            return [
                r[0]
                for r in conn.execute(
                    "SELECT list_id FROM status_lists WHERE retired_at IS NULL ORDER BY list_id"
                )
            ]

    def retire(self, *, now: int, leeway_s: int) -> int:
        """Retire full lists whose tokens have all expired (beyond the leeway); how many."""
        with self._db.transaction() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT list_id FROM status_lists WHERE retired_at IS NULL "
                    "AND allocated >= capacity AND last_exp + ? < ?",
                    (leeway_s, now),
                )
            ]
            for list_id in ids:
                conn.execute(
                    "UPDATE status_lists SET retired_at = ? WHERE list_id = ?", (now, list_id)
                )
                conn.execute("DELETE FROM status_bits WHERE list_id = ?", (list_id,))
        for list_id in ids:
            log.info("status list %d retired: every token in it has expired", list_id)
        return len(ids)


def _insert_or_ignore(conn: Connection, rest: str) -> str:
    """``INSERT OR IGNORE <rest>`` in ``conn``'s dialect."""
    if on_postgresql(conn):
        return f"INSERT {rest} ON CONFLICT DO NOTHING"
    return f"INSERT OR IGNORE {rest}"


@dataclass(frozen=True)
class StatusListToken:
    """One encoding of a list: the JWT, its ``ETag`` and its gzip body."""

    list_id: int
    version: int
    kid: str
    iat: int
    token: str
    etag: str
    gzipped: bytes


class StatusListPublisher:
    """Encodes, signs and caches the Status List Tokens of a :class:`StatusListStore`.

    ``base_url`` is where the lists are published (``<base_url>/statuslists/<k>``,
    the ``uri`` of the tokens' ``status`` claims). ``ttl_s`` is the ``ttl``
    claim (how soon verifiers fetch again), ``lifetime_s`` is ``exp - iat``.
    Thread safe.
    """

    def __init__(
        self,
        store: StatusListStore,
        *,
        issuer: str,
        base_url: str,
        signer: Callable[[], SigningKey],
        ttl_s: int,
        lifetime_s: int,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self.issuer = issuer
        self.prefix = base_url.rstrip("/") + STATUS_LIST_PATH + "/"
        self._signer = signer
        self.ttl_s = ttl_s
        self.lifetime_s = lifetime_s
        self._clock = clock
        self._cache: dict[int, StatusListToken] = {}
        self._lock = threading.Lock()

    def uri(self, list_id: int) -> str:
        return f"{self.prefix}{list_id}"

    def claim(self, entry: StatusEntry) -> dict[str, object]:
        """The ``status`` claim of a token with ``entry``."""
        return {"status_list": {"idx": entry.idx, "uri": self.uri(entry.list_id)}}

    def entry_of(self, status: object) -> StatusEntry:
        """The entry a ``status`` claim of ours names. Raises TokenRejected if it is not ours."""
        ref = parse_status_claim({"status": status})
        if ref is None or not ref.uri.startswith(self.prefix):
            raise TokenRejected("invalid status claim")
        list_id = ref.uri[len(self.prefix):]
        if not _LIST_ID.fullmatch(list_id):
            raise TokenRejected("invalid status claim")
        return StatusEntry(int(list_id), ref.idx)

    def list_id(self, segment: str) -> int | None:
        """The list id in a request path segment, or ``None`` if it cannot be one."""
        return int(segment) if _LIST_ID.fullmatch(segment) else None

    def uris(self) -> list[str]:
        """The uris of the lists served (not retired). DependencyUnavailable."""
        return [self.uri(list_id) for list_id in self._store.live()]

    def token(self, list_id: int) -> StatusListToken:
        """The current Status List Token of list ``list_id``.

        Raises NotFoundError (no such list, or retired), DependencyUnavailable.
        """
        current = self._store.version(list_id)
        if current is None:
            self._cache.pop(list_id, None)
            raise NotFoundError("no such status list")
        key = self._signer()
        cached = self._cache.get(list_id)
        if cached is not None and self._fresh(cached, current[1], key):
            return cached
        with self._lock:
            cached = self._cache.get(list_id)
            if cached is not None and self._fresh(cached, current[1], key):
                return cached
            encoded = self._encode(list_id, key)
            if encoded is None:
                raise NotFoundError("no such status list")
            self._cache[list_id] = encoded
            return encoded

    def _fresh(self, cached: StatusListToken, version: int, key: SigningKey) -> bool:
        age = self._clock() - cached.iat
        return (
            cached.version == version and cached.kid == key.kid and 0 <= age < self.lifetime_s / 2
        )

    def _encode(self, list_id: int, key: SigningKey) -> StatusListToken | None:
        # The version first, then the bits: the content is never older than
        # the version it is labelled with (a bit set in between makes a newer
        # version, encoded at the next request).
        current = self._store.version(list_id)
        if current is None:
            return None
        capacity, version = current
        status_list = StatusList.build(capacity, self._store.set_indices(list_id))
        now = int(self._clock())
        uri = self.uri(list_id)
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": uri,
            "iat": now,
            "exp": now + self.lifetime_s,
            "ttl": self.ttl_s,
            # zlib's run-length strategy: ~100x faster than the default on a
            # sparse list, for a few per cent more bytes (verify.statuslist.encode_lst).
            "status_list": status_list.to_json(rle=True),
        }
        token = jwt.encode(
            payload,
            key.private_key,
            algorithm=key.alg,
            headers={"typ": STATUS_LIST_TYP, "kid": key.kid},
        )
        digest = hashlib.sha256(token.encode()).digest()
        etag = '"' + base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode() + '"'
        return StatusListToken(
            list_id=list_id,
            version=version,
            kid=key.kid,
            iat=now,
            token=token,
            etag=etag,
            gzipped=gzip.compress(token.encode(), 9, mtime=0),
        )
