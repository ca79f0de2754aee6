"""Signing keys: made on first start, kept 0600 in the data dir, rotated, published.

A :class:`SigningKey` is one key loaded in memory (never re-parsed per call):
its ``kid``, its ``alg`` and the private key object (for HS256, the secret
bytes). The algorithm belongs to the key, so a token is verified with the
algorithm of the key its ``kid`` names - from our configuration, never from
the token's header (RFC 8725 section 2.1).

Files: ``DATA_DIR/keys/<kid>.pem`` (PKCS #8 PEM, mode 0600, directory 0700);
the ``signing_keys`` table records each key's algorithm, when it was made,
when a newer key superseded it, and the longest access-token lifetime it was
used with. A superseded key keeps verifying, and stays in the JWK Set, until
``superseded_at + max_ttl_s + RETIRE_SLACK_S``: by then every token it signed
has expired. After that its file and row are deleted.

Rotation publishes before it signs: a new key is in the JWK Set from the
moment it is made, but signs only from ``activates_at`` (by default
:data:`KEY_ACTIVATION_DELAY_S` later), when the previous key becomes
superseded. Verifiers that cache the JWK Set have fetched it by then, so no
valid token is refused. Which key signs is decided from the clock on every
use, so a running service switches at ``activates_at`` without a restart or
a reload. An immediate rotation (``activates_at`` NULL) exists for
emergencies (a compromised key): tokens under the new key may then be
refused by verifiers until they fetch the set again.

Every process refuses a keys directory or key file that another user owns
or that group or others may write, and a key file whose ``kid`` is not the
RFC 7638 thumbprint of its public key (:mod:`auth_rpc.serving.private_files`).

HS256: the secret comes from a file given in the settings (at least 32
bytes), is never written to the data dir and never published: the JWK Set
holds public keys only, so in HS256 mode it is empty (or lists only
asymmetric keys still retiring from before a switch to HS256).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from auth_rpc.auth.changes import ChangeFeed, notify
from auth_rpc.auth.db import AnyDatabase
from auth_rpc.auth.sealing import KEK_NEEDED, KeyEncryptionKeyError, KeySealer
from auth_rpc.errors import DependencyUnavailable
from auth_rpc.serving.private_files import UnsafeFile, check_private, private_dir
from auth_rpc.serving.sqlstore import POSTGRESQL

__all__ = [
    "ALGORITHMS",
    "KEY_ACTIVATION_DELAY_S",
    "MIN_HS256_SECRET_BYTES",
    "RETIRE_SLACK_S",
    "KeyManager",
    "KeyRecord",
    "KeyRing",
    "KeyState",
    "KeyStore",
    "SigningKey",
    "read_hs256_secret",
]

log = logging.getLogger("auth_rpc.auth.keys")

ALGORITHMS = ("EdDSA", "RS256", "ES256", "HS256")
ASYMMETRIC = ("EdDSA", "RS256", "ES256")
MIN_HS256_SECRET_BYTES = 32
RSA_BITS = 2048
#: Extra time a superseded key lives beyond its longest token lifetime
#: (leeway of validators, and the delay before another process sees a rotation).
RETIRE_SLACK_S = 60
#: How long a new key is published before it signs (``rotate-key``, or a switch of
#: algorithm at start): at least what verifiers may cache the JWK Set (its max-age,
#: ``auth_rpc.auth.http.JWKS_MAX_AGE_S`` = 300 s, also the jwks verifier's
#: ``max_key_age_s``) plus the time running services take to see the new key
#: (``KeyManager`` re-reads the key table every 5 s) and a margin.
KEY_ACTIVATION_DELAY_S = 360
#: With a live change feed (PostgreSQL replicas), how often the key table is
#: re-read anyway: notifications do the work, this is a safety net.
FOLLOWED_RELOAD_INTERVAL_S = 60.0
_KID_MAX = 128


def read_hs256_secret(path: Path) -> bytes:
    """The HS256 secret in ``path``: its bytes, without a trailing newline.

    Raises ``ValueError`` if it is shorter than 32 bytes (RFC 7518 section
    3.2: a key of the same size as the hash output or larger), ``OSError`` if
    the file cannot be read.
    """
    data = Path(path).read_bytes()
    secret = data.rstrip(b"\r\n")
    if len(secret) < MIN_HS256_SECRET_BYTES:
        raise ValueError(
            f"the HS256 secret in {path} is {len(secret)} bytes; at least "
            f"{MIN_HS256_SECRET_BYTES} random bytes are required"
        )
    return secret


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class SigningKey:
    """One signing key in memory.

    ``private_key`` is an ``Ed25519PrivateKey`` (EdDSA), an ``RSAPrivateKey``
    of at least 2048 bits (RS256), a P-256 ``EllipticCurvePrivateKey`` (ES256)
    or the secret ``bytes`` (HS256, at least 32). Make one in a test with
    :meth:`generate`. ``repr()`` never shows the key.
    """

    kid: str
    alg: str
    private_key: Any = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.kid or len(self.kid) > _KID_MAX:
            raise ValueError("kid must be 1..128 characters")
        expected: dict[str, type | tuple[type, ...]] = {
            "EdDSA": ed25519.Ed25519PrivateKey,
            "RS256": rsa.RSAPrivateKey,
            "ES256": ec.EllipticCurvePrivateKey,
            "HS256": bytes,
        }
        if self.alg not in expected:
            raise ValueError(f"unsupported algorithm {self.alg!r}; choose one of {ALGORITHMS}")
        if not isinstance(self.private_key, expected[self.alg]):
            raise ValueError(f"the key does not suit {self.alg}")
        key: Any = self.private_key
        if self.alg == "RS256" and key.key_size < RSA_BITS:
            raise ValueError(f"RS256 keys need at least {RSA_BITS} bits")
        if self.alg == "ES256" and not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("ES256 keys must be on the P-256 curve")
        if self.alg == "HS256" and len(key) < MIN_HS256_SECRET_BYTES:
            raise ValueError(
                f"the HS256 secret is {len(key)} bytes; at least "
                f"{MIN_HS256_SECRET_BYTES} are required"
            )

    @classmethod
    def generate(cls, alg: str = "EdDSA", *, kid: str | None = None) -> SigningKey:
        """A new random key for ``alg`` (``kid`` defaults to the RFC 7638 thumbprint).

        Raises ``ValueError`` for an unknown algorithm.
        """
        private: Any
        if alg == "EdDSA":
            private = ed25519.Ed25519PrivateKey.generate()
        elif alg == "RS256":
            private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        elif alg == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        elif alg == "HS256":
            return cls.hs256(secrets.token_bytes(32), kid=kid)
        else:
            raise ValueError(f"unsupported algorithm {alg!r}; choose one of {ALGORITHMS}")
        return cls(kid=kid or _thumbprint(_public_jwk(alg, private.public_key())), alg=alg,
                   private_key=private)

    @classmethod
    def hs256(cls, secret: bytes, *, kid: str | None = None) -> SigningKey:
        """An HS256 key; ``kid`` defaults to a digest that does not reveal the secret.

        Raises ``ValueError`` if the secret is under 32 bytes.
        """
        if kid is None:
            kid = "hs-" + _b64url(hashlib.sha256(b"auth-rpc hs256 kid\0" + secret).digest()[:12])
        return cls(kid=kid, alg="HS256", private_key=bytes(secret))

    @classmethod
    def from_der(cls, der: bytes, *, kid: str, alg: str) -> SigningKey:
        """Load a PKCS #8 DER private key. Raises ``ValueError`` if it does not suit ``alg``."""
        private = serialization.load_der_private_key(der, password=None)
        return cls(kid=kid, alg=alg, private_key=private)

    @classmethod
    def from_pem(cls, pem: bytes, *, kid: str, alg: str) -> SigningKey:
        """Load a PKCS #8 PEM private key. Raises ``ValueError`` if it does not suit ``alg``."""
        private = serialization.load_pem_private_key(pem, password=None)
        return cls(kid=kid, alg=alg, private_key=private)

    @property
    def symmetric(self) -> bool:
        return self.alg == "HS256"

    @property
    def verification_key(self) -> Any:
        """What PyJWT verifies with: the public key object (the secret for HS256)."""
        if self.symmetric:
            return self.private_key
        return self.private_key.public_key()

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS #8 PEM. Raises ``ValueError`` for HS256."""
        if self.symmetric:
            raise ValueError("an HS256 secret has no PEM form")
        pem: bytes = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return pem

    def private_der(self) -> bytes:
        """The private key as unencrypted PKCS #8 DER (what is sealed). ``ValueError`` for HS256."""
        if self.symmetric:
            raise ValueError("an HS256 secret has no DER form")
        der: bytes = self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return der

    def public_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM (for a local verifier).

        Raises ``ValueError`` for HS256.
        """
        if self.symmetric:
            raise ValueError("an HS256 secret has no public key")
        pem: bytes = self.verification_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem

    def public_jwk(self) -> dict[str, str] | None:
        """The public JWK (RFC 7517) with ``kid``, ``alg`` and ``use``; ``None`` for HS256."""
        if self.symmetric:
            return None
        jwk = _public_jwk(self.alg, self.verification_key)
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return jwk


def _public_jwk(alg: str, public_key: Any) -> dict[str, str]:
    converter: Any = {"EdDSA": OKPAlgorithm, "RS256": RSAAlgorithm, "ES256": ECAlgorithm}[alg]
    jwk: dict[str, str] = converter.to_jwk(public_key, as_dict=True)
    return jwk


def _thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url)."""
    required = {
        "OKP": ("crv", "kty", "x"),
        "RSA": ("e", "kty", "n"),
        "EC": ("crv", "kty", "x", "y"),
    }
    members = {name: jwk[name] for name in required[jwk["kty"]]}
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return _b64url(hashlib.sha256(canonical).digest())


@dataclass(frozen=True)
class KeyRecord:
    """A row of ``signing_keys``."""

    kid: str
    alg: str
    created_at: int
    superseded_at: int | None
    max_ttl_s: int
    activates_at: int | None = None  # None: signs from when it was made

    def signs_at(self, now: float) -> bool:
        """Whether this key is the one to sign with at ``now`` (activated, not superseded)."""
        if self.activates_at is not None and now < self.activates_at:
            return False
        return self.superseded_at is None or now < self.superseded_at

    def may_sign(self, now: float) -> bool:
        """Whether this key signs now or will (not superseded yet)."""
        return self.superseded_at is None or now < self.superseded_at

    def retire_at(self) -> float | None:
        """When the key stops verifying (``None`` while it is the signer)."""
        if self.superseded_at is None:
            return None
        return self.superseded_at + self.max_ttl_s + RETIRE_SLACK_S


@dataclass(frozen=True)
class KeyState:
    """A key as ``auth-rpc keys`` shows it.

    ``state``: ``current`` (signs now), ``pending`` (published, signs from
    ``record.activates_at``), ``retired`` (superseded: verifies its tokens
    until ``verifies_until``) or ``standby`` (an HS256 secret signs instead).
    ``last_token_expires_at``: when the last token it may sign expires
    (``None`` while nothing has superseded it).
    """

    record: KeyRecord
    state: str
    last_token_expires_at: int | None
    verifies_until: float | None


class KeyStore:
    """The signing keys: rows of ``signing_keys``, each key's secret half in a file or sealed.

    On SQLite the private key is the file ``keys_dir/<kid>.pem`` (0600). On
    PostgreSQL (:attr:`in_database`) it is the row's ``sealed_key``, sealed
    with ``sealer``'s key-encryption key (:mod:`auth_rpc.auth.sealing`), so that
    every replica has it; nothing is written to ``keys_dir``. Every change
    notifies the other replicas (:mod:`auth_rpc.auth.changes`, topic ``keys``).
    """

    def __init__(
        self, db: AnyDatabase, keys_dir: Path, *, sealer: KeySealer | None = None
    ) -> None:
        self._db = db
        self.keys_dir = keys_dir
        self.sealer = sealer
        self.in_database = db.dialect == POSTGRESQL

    def _need_sealer(self) -> KeySealer:
        if self.sealer is None:
            raise KeyEncryptionKeyError(KEK_NEEDED)
        return self.sealer

    def ensure_dir(self) -> None:
        """Create ``keys_dir`` with mode 0700 (tightening it if it exists).

        Raises :class:`~auth_rpc.serving.private_files.UnsafeFile` if another
        user owns it or group or others may write it, OSError. Nothing to do
        when the keys are in the database.
        """
        if self.in_database:
            return
        private_dir(self.keys_dir, "key directory")

    def unknown_files(self, *, grace_s: float = 30.0) -> list[Path]:
        """Key files (``*.pem``) in ``keys_dir`` that no row of ``signing_keys`` names.

        A file written in the last ``grace_s`` seconds is left out: another
        process (``auth-rpc rotate-key``) writes the file just before its row.
        """
        if self.in_database or not self.keys_dir.is_dir():
            return []
        known = {record.kid for record in self.records()}
        recent = time.time() - grace_s
        return sorted(
            p for p in self.keys_dir.glob("*.pem")
            if p.stem not in known and p.stat().st_mtime < recent
        )

    def records(self) -> list[KeyRecord]:
        """Every key row, oldest first. Raises DependencyUnavailable."""
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT kid, alg, created_at, superseded_at, max_ttl_s, activates_at "
                "FROM signing_keys ORDER BY created_at, kid"
            ).fetchall()
        return [KeyRecord(*row) for row in rows]

    def load(self, record: KeyRecord) -> SigningKey:
        """Read and parse one key (its file, or its sealed row).

        Raises DependencyUnavailable if it is missing or bad;
        :class:`~auth_rpc.auth.sealing.KeyEncryptionKeyError` (one of them)
        if its row is sealed and the KEK is missing or not the one it was
        sealed with, or the row fails authentication.
        """
        if self.in_database:
            with self._db.read() as conn:
                row = conn.execute(
                    "SELECT sealed_key FROM signing_keys WHERE kid = ?", (record.kid,)
                ).fetchone()
            if row is None:
                raise DependencyUnavailable("signing key unavailable")
            if row[0] is not None:
                return self._unsealed(record, bytes(row[0]))
            # A key made before keys were sealed: its file, as on SQLite.
        path = self._path(record.kid)
        try:
            st = check_private(path, "signing key file")  # UnsafeFile passes through
            if st.st_mode & 0o077:
                log.warning("restricting signing key file %s to its owner (mode 0600)", path.name)
                os.chmod(path, 0o600)
            key = SigningKey.from_pem(path.read_bytes(), kid=record.kid, alg=record.alg)
        except (OSError, ValueError, TypeError) as exc:
            log.error("cannot load signing key %s: %s", record.kid, type(exc).__name__)
            raise DependencyUnavailable("signing key unavailable") from exc
        jwk = key.public_jwk()
        if jwk is not None and _thumbprint(jwk) != record.kid:
            # Our kids are RFC 7638 thumbprints: another key was put in this file's place.
            raise UnsafeFile(
                f"signing key file {path}: the key is not the one its kid names (RFC 7638 "
                "thumbprint mismatch): refused"
            )
        return key

    def _unsealed(self, record: KeyRecord, sealed: bytes) -> SigningKey:
        der = self._need_sealer().unseal(record.kid, record.alg, sealed)
        try:
            key = SigningKey.from_der(der, kid=record.kid, alg=record.alg)
        except (ValueError, TypeError) as exc:
            log.error("cannot load signing key %s: %s", record.kid, type(exc).__name__)
            raise DependencyUnavailable("signing key unavailable") from exc
        jwk = key.public_jwk()
        if jwk is not None and _thumbprint(jwk) != record.kid:
            raise KeyEncryptionKeyError(
                f"signing key {record.kid}: the sealed key is not the one its kid names "
                "(RFC 7638 thumbprint mismatch): refused"
            )
        return key

    def transaction(self) -> Any:
        """A transaction of the key table's database (a context manager)."""
        return self._db.transaction()

    def lock(self, conn: Any) -> None:
        """Take the key table's lock (replicas starting together make one first key)."""
        self._db.lock(conn, "signing_keys")

    def add(
        self,
        key: SigningKey,
        *,
        now: int,
        max_ttl_s: int,
        supersede: bool = True,
        activates_at: int | None = None,
    ) -> None:
        """Store ``key`` and record it; older signers become superseded.

        On SQLite the key is written to its file (0600, fsynced) first; on
        PostgreSQL it is sealed into its row (KeyEncryptionKeyError without
        a KEK, before anything is written). ``activates_at`` ``None``: the
        key signs at once, and every key not yet superseded (a pending one
        too) is superseded at ``now``. Else it signs from ``activates_at``,
        when the keys not yet superseded become superseded. Raises
        DependencyUnavailable (database) or OSError (file).
        """
        sealed: bytes | None = None
        path: Path | None = None
        if self.in_database:
            sealed = self._need_sealer().seal(key.kid, key.alg, key.private_der())
        else:
            self.ensure_dir()
            path = self._path(key.kid)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, key.private_pem())
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self.keys_dir)
        try:
            with self._db.transaction() as conn:
                if supersede and activates_at is None:
                    conn.execute(
                        "UPDATE signing_keys SET superseded_at = ? "
                        "WHERE superseded_at IS NULL OR superseded_at > ?",
                        (now, now),
                    )
                elif supersede:
                    conn.execute(
                        "UPDATE signing_keys SET superseded_at = ? WHERE superseded_at IS NULL",
                        (activates_at,),
                    )
                conn.execute(
                    "INSERT INTO signing_keys "
                    "(kid, alg, created_at, superseded_at, max_ttl_s, activates_at, sealed_key) "
                    "VALUES (?, ?, ?, NULL, ?, ?, ?)",
                    (key.kid, key.alg, now, max_ttl_s, activates_at, sealed),
                )
                notify(self._db, conn, "keys")
        except BaseException:
            if path is not None:
                path.unlink(missing_ok=True)
            raise

    def rewrap(self) -> int:
        """Seal every sealed key again under the sealer's KEK (a KEK rotation); how many.

        In one transaction. Raises KeyEncryptionKeyError (a key sealed with a
        KEK not given), DependencyUnavailable.
        """
        sealer = self._need_sealer()
        done = 0
        with self._db.transaction() as conn:
            self.lock(conn)
            rows = conn.execute(
                "SELECT kid, alg, sealed_key FROM signing_keys WHERE sealed_key IS NOT NULL"
            ).fetchall()
            for kid, alg, blob in rows:
                if sealer.sealed_with(bytes(blob)) == sealer.kek_id:
                    continue
                secret = sealer.unseal(kid, alg, bytes(blob))
                conn.execute(
                    "UPDATE signing_keys SET sealed_key = ? WHERE kid = ?",
                    (sealer.seal(kid, alg, secret), kid),
                )
                done += 1
            notify(self._db, conn, "keys")
        return done

    def supersede_all(self, *, now: int) -> None:
        """Mark every current or pending signer superseded (switching to an HS256 secret)."""
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE signing_keys SET superseded_at = ? "
                "WHERE superseded_at IS NULL OR superseded_at > ?",
                (now, now),
            )
            notify(self._db, conn, "keys")

    def note_ttl(self, kid: str, ttl_s: int) -> None:
        """Record that ``kid`` signs tokens living up to ``ttl_s`` (keeps the maximum)."""
        with self._db.transaction() as conn:
            larger = "GREATEST" if self._db.dialect == POSTGRESQL else "MAX"
            conn.execute(
                f"UPDATE signing_keys SET max_ttl_s = {larger}(max_ttl_s, ?) WHERE kid = ?",  # noqa: S608 - constant
                (ttl_s, kid),
            )
            notify(self._db, conn, "keys")

    def delete(self, kid: str) -> None:
        """Forget a retired key: its file, then its row (a file never outlives its row)."""
        self._path(kid).unlink(missing_ok=True)
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM signing_keys WHERE kid = ?", (kid,))
            notify(self._db, conn, "keys")

    def fingerprint(self) -> tuple[tuple[str, int | None, int | None], ...]:
        """A cheap summary that changes whenever keys are added, scheduled or superseded."""
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT kid, superseded_at, activates_at FROM signing_keys ORDER BY kid"
            ).fetchall()
        return tuple((str(k), s, a) for k, s, a in rows)

    def _path(self, kid: str) -> Path:
        if not kid.replace("-", "").replace("_", "").isalnum():
            raise ValueError("unexpected characters in a kid")
        return self.keys_dir / f"{kid}.pem"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@dataclass(frozen=True)
class KeyRing:
    """An immutable snapshot: every key that still verifies (pending ones too).

    ``fixed_signer`` is the HS256 secret when one is configured (it always
    signs); otherwise the signer is the key of ``records`` active at the time
    asked (:meth:`signer_at`).
    """

    fixed_signer: SigningKey | None
    keys: Mapping[str, SigningKey]
    records: Mapping[str, KeyRecord]
    fingerprint: tuple[tuple[str, int | None, int | None], ...]

    def signer_at(self, now: float) -> SigningKey | None:
        """The key that signs at ``now``: the latest activated one not yet superseded."""
        if self.fixed_signer is not None:
            return self.fixed_signer
        best: KeyRecord | None = None
        for record in self.records.values():
            if record.alg not in ASYMMETRIC or not record.signs_at(now):
                continue
            if best is None or _activation_order(record) > _activation_order(best):
                best = record
        return None if best is None else self.keys.get(best.kid)


def _activation_order(record: KeyRecord) -> tuple[int, int, str]:
    start = record.created_at if record.activates_at is None else record.activates_at
    return (start, record.created_at, record.kid)


#: Why ``rotate-key`` refuses when no asymmetric key signs (HS256, or never served).
NO_KEY_TO_ROTATE = (
    "no asymmetric signing key is in use here: the service signs with an HS256 secret (or has "
    "never been started: auth-rpc serve makes the first key). To rotate an HS256 secret, write "
    "a new one (at least 32 random bytes) to the file of serve --hs256-secret-file and restart "
    "auth-rpc serve; give the same file to every verifier (posts-rpc serve --verify local "
    "--hs256-secret-file) and restart them at the same time: tokens signed with the old secret "
    "are refused from then on, and clients log in again"
)


class KeyManager:
    """Owns the key ring of one service: loading, rotation, retirement, lookups.

    Thread safe: lookups read an immutable :class:`KeyRing` swapped atomically.
    A rotation made by another process (``auth-rpc rotate-key``) is picked up
    within ``reload_interval_s`` (checked on use), or at once when a token
    names an unknown ``kid`` (at most once a second). A new key signs
    ``activation_delay_s`` after it is made (published meanwhile): keep it
    above ``reload_interval_s`` plus what verifiers may cache the JWK Set.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        alg: str,
        access_ttl_s: int,
        clock: Callable[[], float],
        hs256_key: SigningKey | None = None,
        reload_interval_s: float = 5.0,
        activation_delay_s: float = KEY_ACTIVATION_DELAY_S,
    ) -> None:
        if alg not in ALGORITHMS:
            raise ValueError(f"unsupported algorithm {alg!r}; choose one of {ALGORITHMS}")
        if alg == "HS256" and hs256_key is None:
            raise ValueError("HS256 needs a secret file (hs256_secret_file)")
        self._store = store
        self.alg = alg
        self._access_ttl_s = access_ttl_s
        self._clock = clock
        self._hs256 = hs256_key
        self._reload_interval_s = reload_interval_s
        if activation_delay_s < 0:
            raise ValueError("activation_delay_s must not be negative")
        self._activation_delay_s = activation_delay_s
        self._lock = threading.Lock()
        self._ring = KeyRing(None, {}, {}, ())
        self._checked_at = float("-inf")
        self._unknown_kid_at = float("-inf")
        self._feed: ChangeFeed | None = None

    @property
    def store(self) -> KeyStore:
        return self._store

    # -- loading ---------------------------------------------------------

    def start(self, *, create: bool) -> None:
        """Load the keys; with ``create``, make a signing key of ``alg`` if none is current.

        Making a key of another algorithm than the current signer's is a
        rotation: the new key is published at once and signs from
        ``activation_delay_s`` later (the old key signs until then, and
        retires after its tokens expire); a first key signs at once. Raises
        DependencyUnavailable, OSError.
        """
        now = int(self._clock())
        self._store.ensure_dir()
        # The keys there are first: a wrong key-encryption key is refused
        # before anything is sealed with it.
        self.reload(force=True)
        if create:
            # Under the key table's lock: replicas starting together on a new
            # database make one first key, not one each.
            with self._store.transaction() as conn:
                self._store.lock(conn)
                self._create(now)
            self.reload(force=True)

    def _create(self, now: int) -> None:
        records = self._store.records()
        current = [r for r in records if r.superseded_at is None]
        if self.alg == "HS256":
            if any(r.may_sign(now) for r in records):
                log.info("switching to HS256; current asymmetric keys retire")
                self._store.supersede_all(now=now)
        elif not any(r.alg == self.alg for r in current):
            key = SigningKey.generate(self.alg)
            signing = any(r.alg in ASYMMETRIC and r.signs_at(now) for r in records)
            activates_at = self._activation_time(now) if signing else None
            self._store.add(
                key, now=now, max_ttl_s=self._access_ttl_s, activates_at=activates_at
            )
            if activates_at is None:
                log.info("made signing key %s (%s)", key.kid, key.alg)
            else:
                log.info(
                    "made signing key %s (%s); published now, signs in %d s",
                    key.kid, key.alg, activates_at - now,
                )

    def follow(self, feed: ChangeFeed) -> None:
        """Reload when another replica changes the keys (``feed``'s ``keys`` topic).

        While the feed is live the key table is re-read only on a notification
        (and every :data:`FOLLOWED_RELOAD_INTERVAL_S` as a safety net); while
        it is not (its connection lost), on every use.
        """
        self._feed = feed
        feed.subscribe("keys", self._changed)

    def _changed(self, _name: str | None) -> None:
        self._checked_at = float("-inf")
        try:
            # Forced: a change the fingerprint leaves out (a key's max_ttl_s) is
            # read too; keys already unsealed are kept, not unsealed again.
            self.reload(force=True)
        except DependencyUnavailable as exc:
            log.warning("key reload failed (%s); will retry on use", exc.message)

    def _interval(self) -> float:
        feed = self._feed
        if feed is None:
            return self._reload_interval_s
        return FOLLOWED_RELOAD_INTERVAL_S if feed.live else 0.0

    def _activation_time(self, now: int, delay_s: float | None = None) -> int | None:
        delay = self._activation_delay_s if delay_s is None else delay_s
        return now + math.ceil(delay) if delay > 0 else None

    def reload(self, *, force: bool = False) -> None:
        """Re-read the key table if it changed (or ``force``); drop retired keys."""
        with self._lock:
            self._checked_at = time.monotonic()
            fingerprint = self._store.fingerprint()
            if not force and fingerprint == self._ring.fingerprint:
                self._retire_locked()
                return
            old = self._ring.keys
            now = self._clock()
            records: dict[str, KeyRecord] = {}
            keys: dict[str, SigningKey] = {}
            for record in self._store.records():
                retire_at = record.retire_at()
                if retire_at is not None and now > retire_at:
                    self._forget(record.kid)
                    continue
                records[record.kid] = record
                keys[record.kid] = old.get(record.kid) or self._store.load(record)
            fixed: SigningKey | None = None
            if self._hs256 is not None:
                fixed = self._hs256
                keys[fixed.kid] = fixed
            else:
                short = [
                    r for r in records.values()
                    if r.may_sign(now) and r.max_ttl_s < self._access_ttl_s
                ]
                if short:
                    # A key made by another process (auth-rpc rotate-key) with a
                    # shorter lifetime in its settings: record ours before it
                    # signs, so that the key does not retire too early.
                    for record in short:
                        self._store.note_ttl(record.kid, self._access_ttl_s)
                    fingerprint = self._store.fingerprint()
                    records = {r.kid: r for r in self._store.records() if r.kid in records}
            self._ring = KeyRing(fixed, keys, records, fingerprint)

    def _retire_locked(self) -> None:
        now = self._clock()
        ring = self._ring
        expired = [
            kid for kid, r in ring.records.items()
            if (at := r.retire_at()) is not None and now > at
        ]
        if not expired:
            return
        for kid in expired:
            self._forget(kid)
        keys = {k: v for k, v in ring.keys.items() if k not in expired}
        records = {k: v for k, v in ring.records.items() if k not in expired}
        self._ring = KeyRing(ring.fixed_signer, keys, records, self._store.fingerprint())

    def _forget(self, kid: str) -> None:
        try:
            self._store.delete(kid)
            log.info("retired signing key %s", kid)
        except (DependencyUnavailable, OSError, sqlite3.Error):
            log.warning("could not delete retired signing key %s", kid)

    def _maybe_reload(self) -> None:
        if time.monotonic() - self._checked_at < self._interval():
            return
        try:
            self.reload()
        except KeyEncryptionKeyError as exc:
            log.error("key reload failed: %s; keeping the loaded keys", exc.message)
        except DependencyUnavailable as exc:
            log.warning("key reload failed (%s); keeping the loaded keys", exc.message)

    # -- use ---------------------------------------------------------------

    def signer(self) -> SigningKey:
        """The current signing key. Raises DependencyUnavailable if there is none."""
        self._maybe_reload()
        signer = self._ring.signer_at(self._clock())
        if signer is None:
            raise DependencyUnavailable("no signing key")
        return signer

    def find(self, kid: str) -> SigningKey | None:
        """The key named ``kid`` if it still verifies, else ``None``."""
        self._maybe_reload()
        ring = self._ring
        key = ring.keys.get(kid)
        if key is None:
            now = time.monotonic()
            if now - self._unknown_kid_at >= 1.0:
                self._unknown_kid_at = now
                try:
                    self.reload()
                except DependencyUnavailable:
                    return None
                ring = self._ring
                key = ring.keys.get(kid)
            if key is None:
                return None
        record = ring.records.get(kid)
        retire_at = record.retire_at() if record is not None else None
        if retire_at is not None and self._clock() > retire_at:
            return None
        return key

    def describe(self) -> list[KeyState]:
        """Every key that still verifies, oldest first, with its state (``auth-rpc keys``).

        Raises DependencyUnavailable.
        """
        self.reload()
        ring = self._ring
        now = self._clock()
        signer = ring.signer_at(now)
        found: list[KeyState] = []
        for kid, record in sorted(ring.records.items(), key=lambda kv: _activation_order(kv[1])):
            retire_at = record.retire_at()
            if retire_at is not None and now > retire_at:
                continue
            if signer is not None and kid == signer.kid:
                state = "current"
            elif record.superseded_at is not None and record.superseded_at <= now:
                state = "retired"
            elif record.activates_at is not None and record.activates_at > now:
                state = "pending"
            else:
                state = "standby"  # not signing: an HS256 secret signs instead
            last = None if record.superseded_at is None else record.superseded_at + record.max_ttl_s
            found.append(KeyState(record, state, last, retire_at))
        return found

    def jwks(self) -> dict[str, object]:
        """The JWK Set (RFC 7517): public keys that still verify, the latest to sign first.

        Never contains an HS256 secret; empty in HS256 mode unless older
        asymmetric keys are still retiring. Never raises (serves the loaded
        keys if the database cannot be read).
        """
        self._maybe_reload()
        ring = self._ring
        now = self._clock()
        entries: list[tuple[tuple[int, int, str], dict[str, str]]] = []
        for kid, key in ring.keys.items():
            record = ring.records.get(kid)
            if record is None:
                continue
            retire_at = record.retire_at()
            if retire_at is not None and now > retire_at:
                continue
            jwk = key.public_jwk()
            if jwk is not None:
                entries.append((_activation_order(record), jwk))
        entries.sort(key=lambda e: e[0], reverse=True)
        return {"keys": [jwk for _, jwk in entries]}

    def rotate(self, alg: str | None = None, *, activate_after_s: float | None = None) -> str:
        """Make a new signing key, published at once; returns its ``kid``.

        It signs from ``activate_after_s`` (default ``activation_delay_s``)
        later, when the current key becomes superseded: verifiers that cache
        the JWK Set fetch it before any token carries it. ``0`` switches at
        once: for emergencies only (a compromised key), as verifiers may refuse
        tokens of the new key until they fetch the set again. ``alg``
        defaults to the algorithm of the newest key. Raises ``ValueError``
        when no asymmetric key is in use (HS256: replace the secret file
        instead; or never started), for HS256 or an unknown algorithm;
        DependencyUnavailable, OSError.
        """
        if self._hs256 is not None:
            raise ValueError(NO_KEY_TO_ROTATE)
        self.reload()
        now = int(self._clock())
        ring = self._ring
        final = [
            r for r in ring.records.values() if r.superseded_at is None and r.alg in ASYMMETRIC
        ]
        if not final:
            raise ValueError(NO_KEY_TO_ROTATE)
        if alg is None:
            alg = max(final, key=_activation_order).alg
        if alg == "HS256":
            raise ValueError(NO_KEY_TO_ROTATE)
        if alg not in ALGORITHMS:
            raise ValueError(f"unsupported algorithm {alg!r}; choose one of {ALGORITHMS}")
        if activate_after_s is not None and not 0 <= activate_after_s <= 366 * 86400:
            raise ValueError("the activation delay must be 0..31622400 seconds")
        activates_at = None
        if ring.signer_at(now) is not None:
            activates_at = self._activation_time(now, activate_after_s)
        key = SigningKey.generate(alg)
        self._store.add(
            key, now=now, max_ttl_s=self._access_ttl_s, activates_at=activates_at
        )
        if activates_at is None:
            log.info("rotated to signing key %s (%s) at once", key.kid, key.alg)
        else:
            log.info(
                "new signing key %s (%s) published; it signs in %d s",
                key.kid, key.alg, activates_at - now,
            )
        self.reload(force=True)
        return key.kid
