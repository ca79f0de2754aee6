"""Access tokens (RFC 9068 JWTs) and refresh tokens (opaque, rotated, in families).

Access tokens: header ``typ: at+jwt``, ``alg``, ``kid``; claims ``iss``,
``sub``, ``aud``, ``exp``, ``iat``, ``nbf``, ``jti`` (144 random bits),
``scope`` (space separated) and ``client_id``. :func:`mint_access_token` makes
one; :class:`AccessTokenChecker` checks one as RFC 8725 and RFC 9068 ask.

Refresh tokens: ``secrets.token_urlsafe(32)`` (256 random bits), stored only
as SHA-256 hashes in :class:`RefreshStore`. Each login starts a *family*; every
refresh marks the presented token used and adds a new one to the family, in
one transaction. Presenting a used token revokes the family and every access
token issued from it (RFC 9700 section 4.14.2). A family lives
``refresh_ttl_s`` from the login, however often it is rotated.

:class:`RevocationStore` keeps revoked access-token ids on disk until the
token would have expired anyway: for tokens without a Token Status List entry
(issued before schema v5); a token with one is revoked by setting its bit
(:mod:`auth_rpc.auth.status`), and a family's revocation sets the bits of its
access tokens in the same transaction.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from auth_rpc.auth.db import AnyDatabase, Connection
from auth_rpc.auth.keys import SigningKey
from auth_rpc.auth.status import StatusEntry, StatusListStore
from auth_rpc.errors import TokenRejected
from auth_rpc.serving.sqlstore import POSTGRESQL
from auth_rpc.verify.principal import Principal

__all__ = [
    "ACCESS_TOKEN_TYPES",
    "LEEWAY_S",
    "MAX_LIFETIME_S",
    "MAX_TOKEN_BYTES",
    "AccessTokenChecker",
    "Family",
    "IssuedTokenStore",
    "RefreshStore",
    "RevocationStore",
    "Rotation",
    "SigningKey",
    "hash_refresh_token",
    "mint_access_token",
    "new_jti",
    "new_refresh_token",
    "principal_from_claims",
]

log = logging.getLogger("auth_rpc.auth.tokens")

#: RFC 9068 section 2.1: "typ" with the value "at+jwt" (or "application/at+jwt").
ACCESS_TOKEN_TYPES = ("at+jwt", "application/at+jwt")
#: Tokens longer than this are refused before any parsing.
MAX_TOKEN_BYTES = 8192
#: Clock skew tolerated on exp, nbf and iat, in seconds.
LEEWAY_S = 30
#: The longest access-token lifetime (exp - iat) accepted, in seconds.
MAX_LIFETIME_S = 86400
_REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub", "jti")
_MAX_CLAIM_CHARS = 1024
#: The most audiences an access token may name (this service mints one).
_MAX_AUDIENCES = 8


def new_jti() -> str:
    """A random token id (144 bits, base64url)."""
    return secrets.token_urlsafe(18)


def new_refresh_token() -> str:
    """A new opaque refresh token (256 random bits, base64url)."""
    return secrets.token_urlsafe(32)


def hash_refresh_token(token: str) -> bytes:
    """The SHA-256 of a refresh token: the only form ever stored."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def mint_access_token(
    key: SigningKey,
    *,
    issuer: str,
    audience: str | Sequence[str],
    subject: str,
    scopes: Iterable[str] | str,
    client_id: str,
    ttl_s: int,
    now: float,
    jti: str | None = None,
    headers: Mapping[str, Any] | None = None,
    claims: Mapping[str, Any] | None = None,
) -> str:
    """Sign an RFC 9068 access token with ``key``.

    ``key`` is a :class:`~auth_rpc.auth.keys.SigningKey` (its ``kid`` goes in the
    header, its ``alg`` signs): the service's own (``AuthService.signing_key()``)
    or, in a test, ``SigningKey.generate("EdDSA")``. ``now`` is unix seconds.
    ``scopes`` is an iterable of scope tokens (or one space-separated
    string). ``headers`` and ``claims`` are merged over the defaults, so a
    test can change anything (``typ``, ``kid``, ``alg`` - PyJWT then signs
    with that algorithm, so ``key`` must suit it); a claim given as ``None``
    is removed (e.g. ``claims={"exp": None}``). Raises ``ValueError`` if
    ``ttl_s`` is not positive.
    """
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    issued = int(now)
    scope = scopes if isinstance(scopes, str) else " ".join(scopes)
    payload: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience if isinstance(audience, str) else list(audience),
        "exp": issued + int(ttl_s),
        "iat": issued,
        "nbf": issued,
        "jti": jti or new_jti(),
        "scope": scope,
        "client_id": client_id,
    }
    for name, value in (claims or {}).items():
        if value is None:
            payload.pop(name, None)
        else:
            payload[name] = value
    header: dict[str, Any] = {"typ": "at+jwt", "kid": key.kid}
    header.update(headers or {})
    return jwt.encode(payload, key.private_key, algorithm=key.alg, headers=header)


class AccessTokenChecker:
    """Checks access tokens issued by this service (RFC 8725, RFC 9068).

    ``find_key(kid)`` returns our key named ``kid`` (or ``None``); the
    algorithm accepted is that key's, never the token header's.
    ``is_revoked(jti)`` may raise DependencyUnavailable, which passes through.

    ``aud`` must be ``audience`` or, when ``known_audience`` is given, a name
    it answers ``True`` for (the Auth service: an audience some account may
    ask tokens for); of a list of audiences, one must be (RFC 7519 section
    4.1.3: the recipient must identify itself with one of its values).
    ``known_audience`` is only asked about tokens whose signature verified;
    it may raise DependencyUnavailable, which passes through.

    ``status_revoked(status)`` answers for a token with a ``status`` claim
    (its Token Status List entry: the one record of its revocation) instead
    of ``is_revoked``; it may raise TokenRejected or DependencyUnavailable.
    """

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        find_key: Callable[[str], SigningKey | None],
        clock: Callable[[], float],
        is_revoked: Callable[[str], bool] | None = None,
        known_audience: Callable[[str], bool] | None = None,
        leeway_s: int = LEEWAY_S,
        max_lifetime_s: int = MAX_LIFETIME_S,
        status_revoked: Callable[[object], bool] | None = None,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self._known_audience = known_audience
        self._find_key = find_key
        self._clock = clock
        self._is_revoked = is_revoked
        self._status_revoked = status_revoked
        self._leeway_s = leeway_s
        self._max_lifetime_s = max_lifetime_s

    def decode(
        self, token: str, *, check_time: bool = True, check_revoked: bool = True
    ) -> dict[str, Any]:
        """The verified claims of ``token``. Raises TokenRejected (generic reason)."""
        if not isinstance(token, str) or not token:
            raise TokenRejected("missing token")
        if len(token) > MAX_TOKEN_BYTES or not token.isascii():
            raise TokenRejected("malformed token")
        if token.count(".") != 2:
            raise TokenRejected("malformed token")
        header = _unverified_header(token)
        # RFC 9068 section 4: "Resource servers MUST verify that the typ
        # header value is "at+jwt" or "application/at+jwt" and reject tokens
        # carrying any other value."
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
            raise TokenRejected("not an access token")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 128:
            raise TokenRejected("unknown signing key")
        key = self._find_key(kid)
        if key is None:
            raise TokenRejected("unknown signing key")
        # RFC 8725 section 3.1: "Libraries MUST enable the caller to specify a
        # supported set of algorithms and MUST NOT use any other algorithms" -
        # the one algorithm of the key the kid names, from our configuration.
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.verification_key,
                algorithms=[key.alg],
                issuer=self.issuer,
                options={
                    "require": list(_REQUIRED_CLAIMS),
                    "verify_signature": True,
                    # Checked below: one of several audiences may be accepted.
                    "verify_aud": False,
                    "verify_iss": True,
                    # Times are checked below against the injected clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidIssuerError as exc:
            raise TokenRejected("wrong issuer") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRejected("missing claim") from exc
        except jwt.InvalidSignatureError as exc:
            raise TokenRejected("bad signature") from exc
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError) as exc:
            raise TokenRejected("invalid token") from exc
        self._check_claims(claims, check_time=check_time)
        self._check_audience(claims["aud"])
        if check_revoked:
            if self._status_revoked is not None and "status" in claims:
                if self._status_revoked(claims["status"]):
                    raise TokenRejected("token revoked")
            elif self._is_revoked is not None and self._is_revoked(claims["jti"]):
                raise TokenRejected("token revoked")
        return claims

    def _check_claims(self, claims: Mapping[str, Any], *, check_time: bool) -> None:
        for name in ("exp", "iat"):
            if not _is_int(claims.get(name)):
                raise TokenRejected("invalid token")
        if "nbf" in claims and not _is_int(claims["nbf"]):
            raise TokenRejected("invalid token")
        for name in ("sub", "jti"):
            value = claims.get(name)
            if not isinstance(value, str) or not value or len(value) > _MAX_CLAIM_CHARS:
                raise TokenRejected("invalid token")
        for name in ("scope", "client_id"):
            value = claims.get(name, "")
            if not isinstance(value, str) or len(value) > _MAX_CLAIM_CHARS:
                raise TokenRejected("invalid token")
        # A token living longer than any we issue was not made by us as
        # configured (a leaked key, a test factory): refuse it.
        if not 0 < claims["exp"] - claims["iat"] <= self._max_lifetime_s:
            raise TokenRejected("invalid token lifetime")
        if not check_time:
            return
        now = self._clock()
        leeway = self._leeway_s
        if now >= claims["exp"] + leeway:
            raise TokenRejected("token expired")
        if "nbf" in claims and now + leeway < claims["nbf"]:
            raise TokenRejected("token not yet valid")
        if now + leeway < claims["iat"]:
            raise TokenRejected("token issued in the future")

    def _check_audience(self, aud: object) -> None:
        values = [aud] if isinstance(aud, str) else aud
        if (
            not isinstance(values, list)
            or not 0 < len(values) <= _MAX_AUDIENCES
            or not all(isinstance(a, str) and 0 < len(a) <= _MAX_CLAIM_CHARS for a in values)
        ):
            raise TokenRejected("wrong audience")
        if self.audience in values:
            return
        known = self._known_audience
        if known is None or not any(known(value) for value in values):
            raise TokenRejected("wrong audience")

    def check(self, token: str) -> Principal:
        """The :class:`Principal` of a valid access token. Raises TokenRejected."""
        return principal_from_claims(self.decode(token))


_B64URL = re.compile(r"[A-Za-z0-9_-]+")


def _unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header, parsed only to pick the key (PyJWT verifies the whole token after).

    Cheaper than ``jwt.get_unverified_header``, which validates every segment
    once more. Raises TokenRejected.
    """
    segment = token.partition(".")[0]
    if not _B64URL.fullmatch(segment):
        raise TokenRejected("malformed token")
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    # ValueError covers JSONDecodeError and UnicodeDecodeError; RecursionError: deep nesting.
    except (ValueError, binascii.Error, RecursionError) as exc:
        raise TokenRejected("malformed token") from exc
    if not isinstance(header, dict):
        raise TokenRejected("malformed token")
    return header


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    """Build the :class:`Principal` of verified claims."""
    aud = claims.get("aud", ())
    audience = (aud,) if isinstance(aud, str) else tuple(str(a) for a in aud)
    return Principal(
        subject=claims["sub"],
        scopes=frozenset(str(claims.get("scope", "")).split()),
        expires_at=int(claims["exp"]),
        token_id=claims["jti"],
        client_id=str(claims.get("client_id", "")),
        issuer=str(claims.get("iss", "")),
        audience=audience,
    )


# -- refresh token families ----------------------------------------------


@dataclass(frozen=True)
class Family:
    """A refresh token family: one login and its rotations."""

    family_id: str
    subject: str
    client_id: str
    scopes: tuple[str, ...]
    created_at: int
    expires_at: int
    #: The audience of the login's access token; ``None``: the service's default.
    audience: str | None = None


@dataclass(frozen=True)
class Rotation:
    """What :meth:`RefreshStore.rotate`'s ``issue`` callback made: stored with the rotation."""

    refresh_token_hash: bytes
    access_jti: str
    access_expires_at: int
    #: The access token's Status List entry (``None``: a token without one).
    access_status: StatusEntry | None = None


class RefreshStore:
    """Refresh token families, their tokens (hashes) and their access-token ids."""

    def __init__(self, db: AnyDatabase) -> None:
        self._db = db

    def start_family(
        self,
        family: Family,
        *,
        token_hash: bytes,
        access_jti: str,
        access_expires_at: int,
        access_status: StatusEntry | None = None,
    ) -> None:
        """Record a new family with its first refresh token and access token (id, status entry)."""
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO refresh_families (family_id, subject, client_id, scopes, created_at, "
                "expires_at, revoked_at, audience) VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
                (family.family_id, family.subject, family.client_id, " ".join(family.scopes),
                 family.created_at, family.expires_at, family.audience),
            )
            conn.execute(
                "INSERT INTO refresh_tokens (token_hash, family_id, issued_at, used_at) "
                "VALUES (?, ?, ?, NULL)",
                (token_hash, family.family_id, family.created_at),
            )
            _record_access_token(
                conn, access_jti, family.family_id, access_expires_at, access_status
            )

    def rotate(
        self, token_hash: bytes, *, now: int, issue: Callable[[Family], Rotation]
    ) -> Rotation:
        """Use the refresh token with ``token_hash`` once, atomically.

        ``issue(family)`` makes the new tokens (it runs inside the transaction
        and may raise to abort it). Raises TokenRejected if the token is
        unknown, its family expired or revoked, or it was used before - in
        which case the whole family and its access tokens are revoked first
        (committed). An ``issue`` that raises (a scope or audience refused)
        rolls everything back: the token stays unused, as if never presented.
        """
        reused = False
        rotation: Rotation | None = None
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT t.used_at, f.family_id, f.subject, f.client_id, f.scopes, f.created_at, "  # noqa: S608 - constant
                "f.expires_at, f.revoked_at, f.audience FROM refresh_tokens t "
                "JOIN refresh_families f ON f.family_id = t.family_id WHERE t.token_hash = ?"
                # PostgreSQL: replicas rotating the same token (or another of
                # its family) wait here for each other, then read the winner's
                # used_at (READ COMMITTED re-reads a locked row): one success,
                # the others see a reuse and revoke the family.
                + self._db.for_update,
                (token_hash,),
            ).fetchone()
            if row is None:
                raise TokenRejected("invalid refresh token")
            used_at, family_id, subject, client_id, scopes, created_at, expires_at, revoked_at = (
                row[:8]
            )
            audience = row[8]
            if revoked_at is not None:
                raise TokenRejected("invalid refresh token")
            if now >= expires_at:
                raise TokenRejected("refresh token expired")
            if used_at is not None:
                # RFC 9700 section 4.14.2: "If a refresh token is compromised and
                # subsequently used by both the attacker and the legitimate
                # client, one of them will present an invalidated refresh
                # token, which will inform the authorization server of the
                # breach" - and it revokes the active refresh token.
                self._revoke_family(conn, family_id, now)
                reused = True
            else:
                family = Family(family_id, subject, client_id, tuple(scopes.split()),
                                created_at, expires_at, audience)
                rotation = issue(family)
                cur = conn.execute(
                    "UPDATE refresh_tokens SET used_at = ? "
                    "WHERE token_hash = ? AND used_at IS NULL",
                    (now, token_hash),
                )
                if cur.rowcount != 1:  # pragma: no cover - excluded by the transaction
                    raise TokenRejected("invalid refresh token")
                conn.execute(
                    "INSERT INTO refresh_tokens (token_hash, family_id, issued_at, used_at) "
                    "VALUES (?, ?, ?, NULL)",
                    (rotation.refresh_token_hash, family_id, now),
                )
                _record_access_token(
                    conn,
                    rotation.access_jti,
                    family_id,
                    rotation.access_expires_at,
                    rotation.access_status,
                )
        if reused:
            log.warning("a used refresh token was presented again; its family is revoked")
            raise TokenRejected("refresh token reused; the session is revoked")
        assert rotation is not None
        return rotation

    def revoke_by_token(
        self, token_hash: bytes, *, now: int, client_id: str | None = None
    ) -> bool:
        """Revoke the family of the refresh token with ``token_hash``; ``False`` if unknown.

        With ``client_id``, only a family issued to that client is revoked
        (``False`` otherwise).
        """
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT t.family_id, f.client_id FROM refresh_tokens t "
                "JOIN refresh_families f ON f.family_id = t.family_id WHERE t.token_hash = ?",
                (token_hash,),
            ).fetchone()
            if row is None or (client_id is not None and row[1] != client_id):
                return False
            self._revoke_family(conn, row[0], now)
        return True

    def revoke_subject(
        self, subject: str, *, now: int, include_client: bool = False
    ) -> int:
        """Revoke every live family of ``subject``; returns how many.

        ``include_client``: also the families issued to the client ``subject``
        (HTTP password grants it made for its users). Each family's access
        tokens are revoked with it.
        """
        where = "(subject = ? OR client_id = ?)" if include_client else "subject = ?"
        params = (subject, subject) if include_client else (subject,)
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT family_id FROM refresh_families "  # noqa: S608 - constants, no input
                f"WHERE {where} AND revoked_at IS NULL",
                params,
            ).fetchall()
            for (family_id,) in rows:
                self._revoke_family(conn, family_id, now)
        return len(rows)

    @staticmethod
    def _revoke_family(conn: Connection, family_id: str, now: int) -> None:
        conn.execute(
            "UPDATE refresh_families SET revoked_at = ? WHERE family_id = ? AND revoked_at IS NULL",
            (now, family_id),
        )
        # One record per revocation: the Status List bit of a token that has an
        # entry (the lists, validate and introspect all read it), else its jti
        # (tokens issued before schema v5).
        StatusListStore.revoke_family(conn, family_id, now=now, leeway_s=LEEWAY_S)
        conn.execute(
            "INSERT INTO revoked_tokens (jti, expires_at) "
            "SELECT jti, expires_at FROM family_access_tokens "
            "WHERE family_id = ? AND status_list IS NULL AND expires_at + ? > ? "
            "ON CONFLICT DO NOTHING",
            (family_id, LEEWAY_S, now),
        )

    def purge(self, *, now: int) -> None:
        """Delete expired families (with their tokens) and expired access-token ids."""
        with self._db.transaction() as conn:
            conn.execute(
                "DELETE FROM family_access_tokens WHERE expires_at + ? < ?", (LEEWAY_S, now)
            )
            conn.execute(
                "DELETE FROM refresh_tokens WHERE family_id IN "
                "(SELECT family_id FROM refresh_families WHERE expires_at < ?)",
                (now,),
            )
            conn.execute("DELETE FROM refresh_families WHERE expires_at < ?", (now,))


def _record_access_token(
    conn: Connection,
    jti: str,
    family_id: str,
    expires_at: int,
    status: StatusEntry | None,
) -> None:
    conn.execute(
        "INSERT INTO family_access_tokens (jti, family_id, expires_at, status_list, status_idx) "
        "VALUES (?, ?, ?, ?, ?)",
        (
            jti,
            family_id,
            expires_at,
            None if status is None else status.list_id,
            None if status is None else status.idx,
        ),
    )


class IssuedTokenStore:
    """The Status List entry of every access token issued (schema v9), until it expires.

    Recorded in the transaction that issues the token, so that an account's
    live access tokens can all be revoked at once (``auth-rpc disable``,
    ``remove``, ``set-password``, ``reset-secret``).
    """

    def __init__(self, db: AnyDatabase) -> None:
        self._db = db

    def record(
        self, entry: StatusEntry, *, subject: str, client_id: str, expires_at: int
    ) -> None:
        """Remember that ``entry`` is a token of ``subject`` issued to ``client_id``."""
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO issued_access_tokens (status_list, status_idx, subject, client_id, "
                "expires_at) VALUES (?, ?, ?, ?, ?)",
                (entry.list_id, entry.idx, subject, client_id, expires_at),
            )

    def revoke_account(self, name: str, *, now: int, include_client: bool = False) -> int:
        """Set the bits of every unexpired access token of ``name``; how many were set.

        ``include_client``: also the tokens issued to the client ``name`` for
        users. Runs in the caller's transaction when there is one.
        """
        where = "(subject = ? OR client_id = ?)" if include_client else "subject = ?"
        params: tuple[object, ...] = (name, name) if include_client else (name,)
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT status_list, status_idx FROM issued_access_tokens "  # noqa: S608
                f"WHERE {where} AND expires_at + ? > ?",
                (*params, LEEWAY_S, now),
            ).fetchall()
            entries = [StatusEntry(int(r[0]), int(r[1])) for r in rows]
            return max(0, StatusListStore.set_bits(conn, entries)) if entries else 0

    def purge(self, *, now: int) -> int:
        """Forget tokens expired (beyond the leeway); how many."""
        with self._db.transaction() as conn:
            cur = conn.execute(
                "DELETE FROM issued_access_tokens WHERE expires_at + ? < ?", (LEEWAY_S, now)
            )
        return cur.rowcount


class RevocationStore:
    """Revoked access-token ids, kept until the token would have expired."""

    def __init__(self, db: AnyDatabase) -> None:
        self._db = db

    def revoke(self, jti: str, *, expires_at: int) -> None:
        """Record ``jti`` as revoked (idempotent)."""
        larger = "GREATEST" if self._db.dialect == POSTGRESQL else "MAX"
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO revoked_tokens (jti, expires_at) VALUES (?, ?) "  # noqa: S608 - constant
                "ON CONFLICT (jti) DO UPDATE SET "
                f"expires_at = {larger}(revoked_tokens.expires_at, excluded.expires_at)",
                (jti, expires_at),
            )

    def is_revoked(self, jti: str) -> bool:
        """Whether ``jti`` was revoked. Raises DependencyUnavailable."""
        with self._db.read() as conn:
            row = conn.execute("SELECT 1 FROM revoked_tokens WHERE jti = ?", (jti,)).fetchone()
        return row is not None

    def purge(self, *, now: int) -> int:
        """Forget revocations of tokens expired (beyond the leeway); returns how many."""
        with self._db.transaction() as conn:
            cur = conn.execute(
                "DELETE FROM revoked_tokens WHERE expires_at + ? < ?", (LEEWAY_S, now)
            )
        return cur.rowcount

