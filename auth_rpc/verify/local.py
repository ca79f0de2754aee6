"""Local mode: an HS256 secret or a PEM public key held in memory."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from auth_rpc.errors import TokenRejected
from auth_rpc.verify._common import (
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
from auth_rpc.verify.principal import NoRevocations, Principal, RevocationCheck
from auth_rpc.verify.statuslist import (
    DEFAULT_MAX_AGE_S,
    DEFAULT_REFRESH_MAX_S,
    StatusListChecker,
)

# -- local --------------------------------------------------------------------


class LocalVerifier(_JwtVerifier):
    """Checks tokens against one key held in memory: an HS256 secret or a public key.

    Give exactly one of ``hs256_secret`` (at least 32 bytes), ``public_key_pem``
    (Ed25519, RSA >= 2048 bits or EC P-256/384/521) or ``key`` (a
    ``cryptography`` public key object). ``algorithms`` defaults to the natural
    one for the key (HS256, EdDSA, RS256, ES256/384/512) and is checked against
    the key type. The key is loaded once here. When ``kid`` is given, a token
    naming another ``kid`` is refused; otherwise ``kid`` is informational.

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
        given = [x is not None for x in (key, public_key_pem, hs256_secret)]
        if sum(given) != 1:
            raise ValueError("give exactly one of key, public_key_pem and hs256_secret")
        verify_key: Any
        if hs256_secret is not None:
            verify_key = _hmac_secret(hs256_secret)
            allowed, default = _HMAC_ALGS, "HS256"
        else:
            if public_key_pem is not None:
                data = (
                    public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
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
        if self._kid is not None and header.get("kid") != self._kid:
            raise TokenRejected("unknown signing key")
        payload = self._verify_signature(token, self._key, alg, header)
        return self._principal(payload, now)

    def _status_list_key(self, header: dict[str, Any], alg: str, now: float) -> Any:
        if self._kid is not None and header.get("kid") != self._kid:
            raise TokenRejected("unknown signing key")
        return self._key


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


