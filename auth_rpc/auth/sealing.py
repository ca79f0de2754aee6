"""Signing keys sealed with a key-encryption key (KEK), for replicas on PostgreSQL.

With ``--database-url`` every Auth replica must sign with the same keys, and
``rotate-key`` must reach all of them. The private keys are therefore kept in
the database (``signing_keys.sealed_key``), each sealed with AES-256-GCM under
a 32-byte key-encryption key that only the Auth hosts hold, in a file
(``--key-encryption-key-file``). A dump of the database alone gives no
private key; the KEK file alone gives nothing either.

A sealed key is ``0x01 || kek_id (8) || nonce (12) || AES-GCM(PKCS #8 DER)``,
authenticated with the associated data ``"auth-rpc signing key v1" 0 kid 0
alg``: a sealed key copied into another row (another kid or algorithm) fails
authentication, and after unsealing the key's RFC 7638 thumbprint must still
be its kid (:class:`auth_rpc.auth.keys.KeyStore`). ``kek_id`` is the first 8
bytes of HMAC-SHA256(KEK, "auth-rpc key-encryption key id"): it names which
KEK sealed a key (so that a wrong KEK file is reported as such) and reveals
nothing about it.

A KEK is rotated by giving the new one as ``--key-encryption-key-file`` and
the old one as ``--old-key-encryption-key-file`` (unseals only), then
``auth-rpc rewrap-keys`` (every key sealed again under the new KEK).

Nothing decrypted is ever logged; :class:`KeySealer`'s ``repr()`` shows only
the KEK ids.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from auth_rpc.errors import DependencyUnavailable
from auth_rpc.serving.private_files import UnsafeFile, check_private_stat

__all__ = [
    "KEK_BYTES",
    "KeyEncryptionKeyError",
    "KeySealer",
    "new_kek_file",
    "read_kek_file",
]

KEK_BYTES = 32
_FORMAT = b"\x01"
_KEK_ID_BYTES = 8
_NONCE_BYTES = 12
_AAD = b"auth-rpc signing key v1\0"
_MAX_FILE_BYTES = 4096

#: What to do when the KEK is needed but not given (the CLI's words).
KEK_NEEDED = (
    "with --database-url the signing keys are kept in the database, sealed with a "
    "key-encryption key: give --key-encryption-key-file FILE (or "
    "AUTH_RPC_KEY_ENCRYPTION_KEY_FILE), the same file on every Auth replica; make one "
    "with auth-rpc new-kek FILE"
)


class KeyEncryptionKeyError(DependencyUnavailable):
    """The KEK is missing, unreadable, malformed, or not the one a key was sealed with."""


def _kek_id(kek: bytes) -> bytes:
    return hmac.digest(kek, b"auth-rpc key-encryption key id", hashlib.sha256)[:_KEK_ID_BYTES]


def read_kek_file(path: Path) -> bytes:
    """The 32-byte KEK in ``path``: exactly 32 bytes, or 64 hex digits (and a newline).

    Refused (:class:`~auth_rpc.serving.private_files.UnsafeFile`): a file another
    user owns, or that group or others may read or write (``chmod 600`` it).
    Raises :class:`KeyEncryptionKeyError` for a missing, unreadable or
    malformed file; the message never shows its contents.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise KeyEncryptionKeyError(
            f"cannot read the key-encryption key file {path}: {exc.strerror or exc}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyEncryptionKeyError(f"the key-encryption key file {path} is not a file")
        check_private_stat(st, path, "key-encryption key file")
        if st.st_mode & 0o077:
            raise UnsafeFile(
                f"key-encryption key file {path} may be read by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): refused; chmod 600 it (and consider the "
                "key exposed: make a new one and rewrap the keys)"
            )
        data = os.read(fd, _MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) == KEK_BYTES:
        return data
    text = data.strip()
    if len(text) == 2 * KEK_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise KeyEncryptionKeyError(
        f"the key-encryption key file {path} holds {len(data)} bytes: expected exactly "
        f"{KEK_BYTES} random bytes (or {2 * KEK_BYTES} hex digits); make one with "
        "auth-rpc new-kek FILE"
    )


def new_kek_file(path: Path) -> str:
    """Write a new random KEK to ``path`` (a new file, mode 0600); returns its id (hex).

    Raises ``FileExistsError`` (never overwrites a KEK: keys sealed with it
    would be lost), ``OSError``.
    """
    path = Path(path)
    kek = secrets.token_bytes(KEK_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.write(fd, kek)
        os.fsync(fd)
    finally:
        os.close(fd)
    return _kek_id(kek).hex()


class KeySealer:
    """Seals private keys under the first KEK given; unseals under any of them.

    The others are old KEKs during a rotation (``--old-key-encryption-key-file``).
    Raises ``ValueError`` for a KEK that is not 32 bytes.
    """

    def __init__(self, kek: bytes, *, old: Sequence[bytes] = ()) -> None:
        aeads: dict[bytes, AESGCM] = {}
        for key in (kek, *old):
            if len(key) != KEK_BYTES:
                raise ValueError(f"a key-encryption key is {KEK_BYTES} bytes")
            aeads.setdefault(_kek_id(key), AESGCM(key))
        self.kek_id = _kek_id(kek)
        self._aeads = aeads

    @classmethod
    def from_files(cls, path: Path, *, old: Sequence[Path] = ()) -> KeySealer:
        """The sealer of the KEK in ``path`` (and old KEKs). Raises as :func:`read_kek_file`."""
        return cls(read_kek_file(path), old=[read_kek_file(p) for p in old])

    def __repr__(self) -> str:
        ids = ", ".join(k.hex() for k in self._aeads)
        return f"KeySealer(kek_id={self.kek_id.hex()}, known=[{ids}])"

    @staticmethod
    def _aad(kid: str, alg: str) -> bytes:
        return _AAD + kid.encode() + b"\0" + alg.encode()

    def seal(self, kid: str, alg: str, secret: bytes) -> bytes:
        """``secret`` (a private key's PKCS #8 DER) sealed for the row ``kid``/``alg``."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._aeads[self.kek_id].encrypt(nonce, secret, self._aad(kid, alg))
        return _FORMAT + self.kek_id + nonce + sealed

    def sealed_with(self, blob: bytes) -> bytes | None:
        """The id of the KEK that sealed ``blob`` (``None``: not a sealed key)."""
        blob = bytes(blob)
        if len(blob) < 1 + _KEK_ID_BYTES + _NONCE_BYTES + 16 or blob[:1] != _FORMAT:
            return None
        return blob[1 : 1 + _KEK_ID_BYTES]

    def unseal(self, kid: str, alg: str, blob: bytes) -> bytes:
        """The secret sealed in ``blob`` for ``kid``/``alg``.

        Raises :class:`KeyEncryptionKeyError`: sealed with a KEK not given
        (the message names both ids), or failing authentication (the row was
        altered, or moved from another kid or algorithm).
        """
        blob = bytes(blob)
        kek_id = self.sealed_with(blob)
        if kek_id is None:
            raise KeyEncryptionKeyError(f"signing key {kid}: its sealed form is malformed")
        aead = self._aeads.get(kek_id)
        if aead is None:
            raise KeyEncryptionKeyError(
                f"signing key {kid} is sealed with another key-encryption key (id "
                f"{kek_id.hex()}) than the file given (id {self.kek_id.hex()}): give every "
                "replica the same --key-encryption-key-file (during a KEK rotation, the "
                "old one as --old-key-encryption-key-file)"
            )
        start = 1 + _KEK_ID_BYTES
        nonce, sealed = blob[start : start + _NONCE_BYTES], blob[start + _NONCE_BYTES :]
        try:
            return aead.decrypt(nonce, sealed, self._aad(kid, alg))
        except InvalidTag:
            raise KeyEncryptionKeyError(
                f"signing key {kid}: its sealed form fails authentication (the database row "
                "was altered or copied from another key): refused"
            ) from None
