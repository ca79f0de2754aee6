"""Local mode: an HS256 secret or a PEM public key held in memory."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from auth_rpc.errors import TokenRejected
from auth_rpc.verify._common import (
    _ASYMMETRIC_ALGS,
    _HMAC_ALGS,
    _MIN_HMAC_SECRET_BYTES,
    DEFAULT_LEEWAY_S,
    DEFAULT_MAX_LIFETIME_S,
    DEFAULT_MAX_TOKEN_BYTES,
    DEFAULT_TIMEOUT_S,
)
from auth_rpc.verify._jwt import (
    STATUS_REQUIRED,
    _algorithms_for_key,
    _check_algorithms,
    _JwtVerifier,
)
from auth_rpc.verify.cache import DEFAULT_CACHE_SIZE, DEFAULT_CACHE_TTL_S
from auth_rpc.verify.jwks import _JwkEntry, parse_jwk_set
from auth_rpc.verify.principal import NoRevocations, Principal, RevocationCheck
from auth_rpc.verify.statuslist import (
    DEFAULT_MAX_AGE_S,
    DEFAULT_REFRESH_MAX_S,
    StatusListChecker,
)

log = logging.getLogger(__name__)

#: A JWK Set file larger than this is refused (ours hold a few keys: ~1 KiB).
MAX_JWKS_FILE_BYTES = 1 << 20
#: How often an unknown ``kid`` may make the verifier look at its JWK Set file again.
JWKS_FILE_RECHECK_S = 1.0
_PRIVATE_PEM = b"PRIVATE KEY-----"

# -- local --------------------------------------------------------------------


class LocalVerifier(_JwtVerifier):
    """Checks tokens against one key held in memory: an HS256 secret or a public key.

    Give exactly one of ``hs256_secret`` (at least 32 bytes), ``public_key_pem``
    (Ed25519, RSA >= 2048 bits or EC P-256/384/521), ``key`` (a
    ``cryptography`` public key object), ``jwk_set`` (a JWK Set, RFC 7517: a
    mapping or its JSON text) or ``jwks_file`` (a file holding one, as
    ``auth-rpc export-public-key --jwks FILE`` writes it). ``algorithms``
    defaults to the natural one for the key (HS256, EdDSA, RS256,
    ES256/384/512; for a JWK Set: EdDSA, RS256 and ES256) and is checked
    against the key type. The key is loaded once here. When ``kid`` is given,
    a token naming another ``kid`` is refused; otherwise ``kid`` is
    informational. With a JWK Set, a token's ``kid`` picks its key (one the
    set lacks is refused), so the verifier keeps working across a key
    rotation when the set holds the next key; a ``jwks_file`` is read again
    (at most once a second, when it changed) when a token names a ``kid``
    it lacks, so replacing the file (``export-public-key --jwks``) needs no
    restart.

    Token Status Lists (``status_list``, on by default): every token must carry
    a ``status`` claim naming its entry in a list under ``status_list_prefix``
    (default ``<issuer>/statuslists/``); the list is fetched over HTTP
    (``session``, ``timeout_s``), verified with the same key, kept, refreshed
    every ``ttl`` (at most ``status_refresh_max_s``) and the token's bit is
    checked on every call, cached or not. A list not confirmed by the issuer
    for ``status_max_age_s`` fails the call closed. ``status_list="if-present"``
    accepts tokens without the claim (another issuer's), ``"off"`` ignores it.
    See :mod:`auth_rpc.verify.statuslist`.

    Raises ``ValueError`` for any misconfiguration.
    """

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        algorithms: Iterable[str] | None = None,
        key: Any = None,
        public_key_pem: bytes | str | None = None,
        hs256_secret: bytes | str | None = None,
        jwk_set: Mapping[str, Any] | str | bytes | None = None,
        jwks_file: str | Path | None = None,
        kid: str | None = None,
        leeway_s: float = DEFAULT_LEEWAY_S,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        max_lifetime_s: float = DEFAULT_MAX_LIFETIME_S,
        revocations: RevocationCheck | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        clock: Callable[[], float] = time.time,
        status_list: str = STATUS_REQUIRED,
        status_list_prefix: str | None = None,
        status_max_age_s: float = DEFAULT_MAX_AGE_S,
        status_refresh_max_s: float = DEFAULT_REFRESH_MAX_S,
        status_checker: StatusListChecker | None = None,
        session: requests.Session | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        given = [x is not None for x in (key, public_key_pem, hs256_secret, jwk_set, jwks_file)]
        if sum(given) != 1:
            raise ValueError(
                "give exactly one of key, public_key_pem, hs256_secret, jwk_set and jwks_file"
            )
        verify_key: Any = None
        self._jwks_file = None if jwks_file is None else Path(jwks_file)
        self._jwks_lock = threading.Lock()
        self._jwks_seen: tuple[int, int] | None = None
        self._jwks_checked_at = float("-inf")
        self._set: dict[str, _JwkEntry] | None = None
        if jwk_set is not None or jwks_file is not None:
            algs = _check_algorithms(
                ("EdDSA", "RS256", "ES256") if algorithms is None else algorithms,
                _ASYMMETRIC_ALGS,
            )
            if jwks_file is not None:
                self._set = self._read_jwks_file(algs)
            else:
                self._set = _jwk_set(jwk_set, algs)
            if not self._set:
                raise ValueError("the JWK Set holds no usable public signing key")
        elif hs256_secret is not None:
            verify_key = _hmac_secret(hs256_secret)
            allowed, default = _HMAC_ALGS, "HS256"
        else:
            if public_key_pem is not None:
                data = (
                    public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
                )
                if _PRIVATE_PEM in data:
                    raise ValueError(
                        "public_key_pem holds a private key: give the public key (auth-rpc "
                        "export-public-key writes it), never the private one"
                    )
                if data.lstrip().startswith(b"{"):
                    raise ValueError(
                        "public_key_pem is JSON, not PEM: a JWK Set goes in jwk_set or jwks_file"
                    )
                try:
                    verify_key = load_pem_public_key(data)
                except (ValueError, TypeError) as exc:
                    raise ValueError("public_key_pem is not a PEM public key") from exc
                except Exception as exc:  # cryptography's UnsupportedAlgorithm
                    raise ValueError("unsupported public key") from exc
            else:
                verify_key = key.public_key() if hasattr(key, "private_bytes") else key
            allowed = _algorithms_for_key(verify_key)
            default = next(iter(allowed)) if len(allowed) == 1 else "RS256"
        if self._set is None:
            algs = _check_algorithms([default] if algorithms is None else algorithms, allowed)
        if isinstance(verify_key, bytes):
            # RFC 7518 §3.2: "A key of the same size as the hash output ... or larger MUST be used".
            for alg in algs:
                if len(verify_key) < int(alg[2:]) // 8:
                    raise ValueError(f"{alg} needs a secret of at least {int(alg[2:]) // 8} bytes")
        super().__init__(
            issuer=issuer,
            audience=audience,
            algorithms=algs,
            leeway_s=leeway_s,
            max_token_bytes=max_token_bytes,
            max_lifetime_s=max_lifetime_s,
            revocations=revocations if revocations is not None else NoRevocations(),
            cache_size=cache_size,
            cache_ttl_s=cache_ttl_s,
            clock=clock,
            status_list=status_list,
            status_list_prefix=status_list_prefix,
            status_max_age_s=status_max_age_s,
            status_refresh_max_s=status_refresh_max_s,
            status_checker=status_checker,
            status_session=session,
            status_timeout_s=timeout_s,
        )
        self._key = verify_key
        self._kid = kid

    def _verify_uncached(self, token: str, now: float) -> Principal:
        header, alg = self._header(token)
        payload = self._verify_signature(token, self._key_of(header, alg), alg, header)
        return self._principal(payload, now)

    def _status_list_key(self, header: dict[str, Any], alg: str, now: float) -> Any:
        return self._key_of(header, alg)

    def _key_of(self, header: dict[str, Any], alg: str) -> Any:
        """The key that verifies a token with ``header`` (its ``kid`` in a JWK Set)."""
        if self._kid is not None and header.get("kid") != self._kid:
            raise TokenRejected("unknown signing key")
        if self._set is None:
            return self._key
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("token lacks a key id")
        entry = self._set.get(kid)
        if entry is None and self._jwks_file is not None:
            self._maybe_reread()
            entry = self._set.get(kid)
        if entry is None:
            raise TokenRejected("unknown signing key")
        if alg not in entry.algorithms:
            raise TokenRejected("algorithm not allowed")
        return entry.key

    def _read_jwks_file(self, algs: frozenset[str]) -> dict[str, _JwkEntry]:
        """The keys of the JWK Set file. Raises ``OSError``, ``ValueError``."""
        assert self._jwks_file is not None
        path = self._jwks_file
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(MAX_JWKS_FILE_BYTES + 1)
        if len(data) > MAX_JWKS_FILE_BYTES:
            raise ValueError(f"the JWK Set file {path} is over {MAX_JWKS_FILE_BYTES} bytes")
        try:
            keys = _jwk_set(data, algs)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        self._jwks_seen = (st.st_mtime_ns, st.st_size)
        return keys

    def _maybe_reread(self) -> None:
        """Read the JWK Set file again if it changed (at most once a second); keep the keys
        held if the new file is unusable."""
        path = self._jwks_file
        assert path is not None
        with self._jwks_lock:
            now = time.monotonic()
            if now - self._jwks_checked_at < JWKS_FILE_RECHECK_S:
                return
            self._jwks_checked_at = now
            try:
                st = os.stat(path)
                if (st.st_mtime_ns, st.st_size) == self._jwks_seen:
                    return
                keys = self._read_jwks_file(self.algorithms)
            except (OSError, ValueError) as exc:
                log.warning("JWK Set file %s unusable (%s); keeping the keys held", path, exc)
                return
            if not keys:
                log.warning("JWK Set file %s has no usable key; keeping the keys held", path)
                return
            self._set = keys
            log.info("JWK Set file %s read again: %d key(s)", path, len(keys))


def _jwk_set(document: Mapping[str, Any] | str | bytes | None, algs: frozenset[str]) -> dict[
    str, _JwkEntry
]:
    if isinstance(document, (str, bytes)):
        try:
            document = json.loads(document)
        except (ValueError, RecursionError):
            raise ValueError("the JWK Set is not JSON") from None
    return parse_jwk_set(document, algs)


def _hmac_secret(secret: bytes | str) -> bytes:
    data = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(data) < _MIN_HMAC_SECRET_BYTES:
        raise ValueError(f"the HS256 secret must be at least {_MIN_HMAC_SECRET_BYTES} bytes")
    try:
        jwt.get_algorithm_by_name("HS256").prepare_key(data)
    except jwt.InvalidKeyError as exc:  # a PEM or SSH public key given as an HMAC secret
        raise ValueError("the HS256 secret looks like a public key") from exc
    return data


def read_secret_file(path: str | Path) -> bytes:
    """The bytes of a secret file, without a trailing newline (``OSError`` if unreadable)."""
    data = Path(path).read_bytes()
    return data.rstrip(b"\r\n")


