"""Embeddable access-token verifiers: local, JWKS, introspection and Thrift.

Every verifier implements :class:`auth_rpc.verify.principal.TokenVerifier`:
``verify(token) -> Principal`` raising :class:`~auth_rpc.errors.TokenRejected`
(the token is not acceptable) or :class:`~auth_rpc.errors.DependencyUnavailable`
(what is needed to decide cannot be reached: the caller refuses the call, it
never accepts it), and ``close()``.

- :class:`LocalVerifier`: an HS256 secret or a PEM public key held in memory.
- :class:`JwksVerifier`: public keys fetched from a configured JWK Set URL.
- :class:`IntrospectionVerifier`: RFC 7662 token introspection, any server.
- :class:`ThriftVerifier`: ``Auth.validate`` over pooled Thrift connections.

All of them share the verified-token cache of :mod:`auth_rpc.verify.cache`. For the
remote modes its TTL (``cache_ttl_s``, 30 s by default) is how long a revoked
token may still be accepted; ``cache_ttl_s=0`` turns it off. Local modes hold
no revocation list unless given a :class:`~auth_rpc.verify.principal.RevocationCheck`,
consulted on every call, cached or not.

Misconfiguration (a short HS256 secret, an algorithm the key cannot verify,
``none``) raises ``ValueError`` at construction: it is never a token rejection.
Rejection messages are short and generic and never contain the token.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import math
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from requests.adapters import HTTPAdapter
from thriftpy2.thrift import TApplicationException

from auth_rpc.errors import AuthError, DependencyUnavailable, TokenRejected
from auth_rpc.idl import auth_thrift, common_thrift
from auth_rpc.serving.transport import TLSClientConfig, open_client, parse_hostport
from auth_rpc.verify.cache import DEFAULT_CACHE_SIZE, DEFAULT_CACHE_TTL_S, CachingVerifier
from auth_rpc.verify.principal import NoRevocations, Principal, RevocationCheck, TokenVerifier

__all__ = [
    "IntrospectionVerifier",
    "JwksVerifier",
    "LocalVerifier",
    "ThriftVerifier",
    "make_verifier",
    "read_secret_file",
]

log = logging.getLogger("auth_rpc.verify.verifiers")

DEFAULT_LEEWAY_S = 30.0
DEFAULT_MAX_TOKEN_BYTES = 8192
DEFAULT_MAX_LIFETIME_S = 86400.0
DEFAULT_TIMEOUT_S = 2.0

#: RFC 9068 §2.1: "Resource servers MUST verify that the typ value is at+jwt or application/at+jwt".
_AT_JWT_TYPES = frozenset({"at+jwt", "application/at+jwt"})
_REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub", "jti")
_HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALG_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_ASYMMETRIC_ALGS = _RSA_ALGS | frozenset(_EC_ALG_BY_CURVE.values()) | {"EdDSA"}
_MIN_HMAC_SECRET_BYTES = 32
_MIN_RSA_BITS = 2048


# -- shared JWT policy --------------------------------------------------------


def _algorithms_for_key(key: Any) -> frozenset[str]:
    """The JWS algorithms ``key`` can verify; ``ValueError`` for an unusable key."""
    if isinstance(key, (Ed25519PublicKey, Ed448PublicKey)):
        return frozenset({"EdDSA"})
    if isinstance(key, RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"RSA keys must have at least {_MIN_RSA_BITS} bits")
        return _RSA_ALGS
    if isinstance(key, EllipticCurvePublicKey):
        alg = _EC_ALG_BY_CURVE.get(key.curve.name)
        if alg is None:
            raise ValueError(f"unsupported elliptic curve {key.curve.name}")
        return frozenset({alg})
    raise ValueError(f"unsupported key type {type(key).__name__}")


def _check_algorithms(configured: Iterable[str] | None, allowed: frozenset[str]) -> frozenset[str]:
    if configured is None:
        raise ValueError("algorithms must be configured")
    algs = frozenset(configured)
    if not algs:
        raise ValueError("at least one algorithm must be allowed")
    if any(a.lower() == "none" for a in algs):
        raise ValueError('the "none" algorithm is never allowed')
    unusable = algs - allowed
    if unusable:
        raise ValueError(f"algorithms {sorted(unusable)} cannot be used with this key")
    return algs


def _b64url_json(segment: str) -> Any:
    try:
        raw = base64.b64decode(segment + "=" * (-len(segment) % 4), altchars=b"-_", validate=True)
        return json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        raise TokenRejected("malformed token") from None


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TokenRejected(f"invalid {name} claim")
    return float(value)


def _audiences(value: Any) -> tuple[str, ...] | None:
    """``aud`` as a tuple (RFC 7519 §4.1.3: a string or an array of strings); None if malformed."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(a, str) for a in value):
        return tuple(value)
    return None


def _check_settings(issuer: str, audience: str, leeway_s: float) -> None:
    if not isinstance(issuer, str) or not issuer:
        raise ValueError("issuer must be configured")
    if not isinstance(audience, str) or not audience:
        raise ValueError("audience must be configured")
    if not 0 <= leeway_s <= 300:
        raise ValueError("leeway_s must be between 0 and 300 seconds")


class _JwtVerifier(CachingVerifier):
    """RFC 9068 / RFC 8725 checks shared by the local and JWKS verifiers."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        algorithms: frozenset[str],
        leeway_s: float,
        max_token_bytes: int,
        max_lifetime_s: float,
        revocations: RevocationCheck,
        cache_size: int,
        cache_ttl_s: float,
        clock: Callable[[], float],
    ) -> None:
        _check_settings(issuer, audience, leeway_s)
        if max_lifetime_s <= 0:
            raise ValueError("max_lifetime_s must be positive")
        super().__init__(
            max_token_bytes=max_token_bytes,
            cache_size=cache_size,
            cache_ttl_s=cache_ttl_s,
            clock=clock,
        )
        self.issuer = issuer
        self.audience = audience
        self.algorithms = algorithms
        self._leeway_s = float(leeway_s)
        self._max_lifetime_s = float(max_lifetime_s)
        self._revocations = revocations
        if not isinstance(revocations, NoRevocations):
            self._recheck = self._check_revoked
        self._jws = jwt.PyJWS(options={"enforce_minimum_key_length": True})

    def _check_revoked(self, principal: Principal) -> None:
        try:
            revoked = self._revocations.is_revoked(principal.token_id)
        except AuthError:
            raise
        except Exception as exc:
            raise DependencyUnavailable("revocation check failed") from exc
        if revoked:
            raise TokenRejected("token revoked")

    def _header(self, token: str) -> tuple[dict[str, Any], str]:
        """The unverified JOSE header and its ``alg``, after the policy checks on it."""
        head, sep, rest = token.partition(".")
        if not sep or rest.count(".") != 1:
            raise TokenRejected("malformed token")
        header = _b64url_json(head)
        if not isinstance(header, dict):
            raise TokenRejected("malformed token")
        alg = header.get("alg")
        # RFC 8725 §3.1: "Libraries MUST enable the caller to specify a supported set of
        # algorithms and MUST NOT use any other algorithms" -- the header only selects
        # among the configured ones, and "none" is never configurable.
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise TokenRejected("algorithm not allowed")
        typ = header.get("typ")
        # RFC 9068 §4: "Resource servers MUST verify that the typ header value is at+jwt
        # or application/at+jwt and reject tokens carrying any other value."
        if not isinstance(typ, str) or typ.lower() not in _AT_JWT_TYPES:
            raise TokenRejected("wrong token type")
        # RFC 7515 §4.1.11: a recipient that does not understand a "crit" extension
        # MUST reject the JWS. We understand none.
        if "crit" in header:
            raise TokenRejected("unsupported critical header")
        # jku, x5u, jwk and x5c are ignored: keys come only from configuration.
        return header, alg

    def _verify_signature(self, token: str, key: Any, alg: str) -> bytes:
        try:
            decoded = self._jws.decode_complete(token, key=key, algorithms=[alg])
        except jwt.InvalidSignatureError:
            raise TokenRejected("invalid token signature") from None
        except jwt.InvalidAlgorithmError:
            raise TokenRejected("algorithm not allowed") from None
        except jwt.InvalidKeyError:
            raise TokenRejected("invalid token signature") from None
        except jwt.PyJWTError:
            raise TokenRejected("malformed token") from None
        payload: bytes = decoded["payload"]
        return payload

    def _principal(self, payload: bytes, now: float) -> Principal:
        try:
            claims = json.loads(payload)
        except (ValueError, RecursionError):
            raise TokenRejected("malformed token") from None
        if not isinstance(claims, dict):
            raise TokenRejected("malformed token")
        for name in _REQUIRED_CLAIMS:
            if claims.get(name) is None:
                raise TokenRejected(f"token lacks the {name} claim")
        exp = _number(claims, "exp")
        iat = _number(claims, "iat")
        nbf = _number(claims, "nbf")
        assert exp is not None and iat is not None
        leeway = self._leeway_s
        # RFC 7519 §4.1.4: "the current date/time MUST be before the expiration date/time".
        if exp <= now - leeway:
            raise TokenRejected("token expired")
        if iat > now + leeway:
            raise TokenRejected("token issued in the future")
        if nbf is not None and nbf > now + leeway:
            raise TokenRejected("token not yet valid")
        if exp <= iat:
            raise TokenRejected("invalid token lifetime")
        if exp - iat > self._max_lifetime_s:
            raise TokenRejected("token lifetime too long")
        # RFC 9068 §4: "The resource server MUST validate that the iss claim exactly matches
        # the issuer" and "MUST validate that the aud claim contains a resource indicator
        # value corresponding to an identifier the resource server expects for itself".
        if claims["iss"] != self.issuer:
            raise TokenRejected("wrong issuer")
        audiences = _audiences(claims["aud"])
        if audiences is None:
            raise TokenRejected("invalid aud claim")
        if self.audience not in audiences:
            raise TokenRejected("wrong audience")
        sub, jti = claims["sub"], claims["jti"]
        if not isinstance(sub, str) or not sub:
            raise TokenRejected("invalid sub claim")
        if not isinstance(jti, str) or not jti:
            raise TokenRejected("invalid jti claim")
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise TokenRejected("invalid scope claim")
        client_id = claims.get("client_id", "")
        if not isinstance(client_id, str):
            raise TokenRejected("invalid client_id claim")
        return Principal(
            subject=sub,
            scopes=frozenset(scope.split()),
            expires_at=int(exp),
            token_id=jti,
            client_id=client_id,
            issuer=self.issuer,
            audience=audiences,
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
        )
        self._key = verify_key
        self._kid = kid

    def _verify_uncached(self, token: str, now: float) -> Principal:
        header, alg = self._header(token)
        if self._kid is not None and header.get("kid") != self._kid:
            raise TokenRejected("unknown signing key")
        payload = self._verify_signature(token, self._key, alg)
        return self._principal(payload, now)


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


# -- jwks ---------------------------------------------------------------------


@dataclass(frozen=True)
class _JwkEntry:
    key: Any
    algorithms: frozenset[str]


class _FetchError(Exception):
    pass


def _read_body(resp: requests.Response, limit: int, deadline: float) -> bytes:
    """The response body, bounded in size and in total time (``_FetchError``)."""
    length = resp.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _FetchError("answer too large")
    chunks: list[bytes] = []
    size = 0
    for chunk in resp.iter_content(chunk_size=16384):
        size += len(chunk)
        if size > limit:
            raise _FetchError("answer too large")
        if time.monotonic() > deadline:
            raise _FetchError("answer too slow")
        chunks.append(chunk)
    return b"".join(chunks)


def _new_session(pool_size: int) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxies or .netrc credentials from the environment
    # Shared by every serving thread: keep it stateless (no cookies from the server).
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _check_url(url: str, what: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http(s) URL")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
        log.warning("%s %s is plain HTTP: use HTTPS outside a trusted network", what, url)


class JwksVerifier(_JwtVerifier):
    """Checks tokens against the public keys of a JWK Set fetched from ``jwks_url``.

    Keys are cached by ``kid``. A token naming an unknown ``kid`` triggers a
    fetch at most once per ``refresh_cooldown_s`` (one fetch however many
    threads ask); the set is also fetched again when older than
    ``max_key_age_s``, by the one call that finds it stale (other calls keep using the
    old keys meanwhile). While the endpoint is down the cached keys stay in use; with no
    key ever fetched every call fails with ``DependencyUnavailable`` (a fetch
    is retried after ``failure_retry_s``). Only keys with ``use`` ``sig`` (or
    no ``use``), a ``kid``, and an algorithm in ``algorithms`` are used;
    symmetric (``oct``) keys are ignored, and so are URLs and keys carried in
    a token (``jku``, ``x5u``, ``jwk``). Redirects are not followed.

    Raises ``ValueError`` for misconfiguration (an HMAC algorithm, ``none``).
    """

    def __init__(
        self,
        *,
        jwks_url: str,
        issuer: str,
        audience: str,
        algorithms: Iterable[str] = ("EdDSA", "RS256", "ES256"),
        timeout_s: float = DEFAULT_TIMEOUT_S,
        refresh_cooldown_s: float = 30.0,
        max_key_age_s: float = 300.0,
        failure_retry_s: float = 2.0,
        max_jwks_bytes: int = 1 << 20,
        leeway_s: float = DEFAULT_LEEWAY_S,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        max_lifetime_s: float = DEFAULT_MAX_LIFETIME_S,
        revocations: RevocationCheck | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_url(jwks_url, "jwks_url")
        algs = _check_algorithms(algorithms, _ASYMMETRIC_ALGS)
        if not 0 < timeout_s <= 30:
            raise ValueError("timeout_s must be in (0, 30]")
        if refresh_cooldown_s < 0 or failure_retry_s < 0 or max_key_age_s <= 0:
            raise ValueError("refresh intervals must not be negative")
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
        )
        self.jwks_url = jwks_url
        self._timeout_s = float(timeout_s)
        self._cooldown_s = float(refresh_cooldown_s)
        self._max_key_age_s = float(max_key_age_s)
        self._failure_retry_s = float(failure_retry_s)
        self._max_jwks_bytes = max_jwks_bytes
        self._own_session = session is None
        self._session = session if session is not None else _new_session(2)
        # Published whole and never mutated afterwards: readers need no lock.
        self._keys: dict[str, _JwkEntry] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._last_ok = False
        self._attempts = 0
        self._fetch_lock = threading.Lock()

    @property
    def key_ids(self) -> frozenset[str]:
        """The ``kid`` of every key in use."""
        return frozenset(self._keys)

    @property
    def fetch_count(self) -> int:
        """How many fetches were attempted (for monitoring and tests)."""
        return self._attempts

    def prefetch(self) -> int:
        """Fetch the key set now; return the number of usable keys.

        Raises ``DependencyUnavailable`` when the endpoint cannot be reached or
        does not answer a JWK Set (the cached keys, if any, stay in use).
        """
        if not self._fetch_lock.acquire(timeout=2 * self._timeout_s + 1):
            raise DependencyUnavailable("JWKS endpoint unreachable")
        try:
            self._fetch_locked(self._clock())
            if not self._last_ok:
                raise DependencyUnavailable("JWKS endpoint unreachable")
            return len(self._keys)
        finally:
            self._fetch_lock.release()

    def _verify_uncached(self, token: str, now: float) -> Principal:
        header, alg = self._header(token)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("token lacks a key id")
        entry = self._key_for(kid, now)
        if alg not in entry.algorithms:
            raise TokenRejected("algorithm not allowed")
        payload = self._verify_signature(token, entry.key, alg)
        return self._principal(payload, now)

    def _key_for(self, kid: str, now: float) -> _JwkEntry:
        entry = self._keys.get(kid)
        if entry is not None:
            fetched_at = self._fetched_at
            if fetched_at is not None and not 0 <= now - fetched_at < self._max_key_age_s:
                self._refresh(now, wait=False)  # best effort; old keys serve if it fails
                entry = self._keys.get(kid)
                if entry is None:  # the key was withdrawn from the set
                    raise TokenRejected("unknown signing key")
            return entry
        self._refresh(now, wait=True)
        entry = self._keys.get(kid)
        if entry is not None:
            return entry
        if not self._last_ok:
            raise DependencyUnavailable("JWKS endpoint unreachable")
        raise TokenRejected("unknown signing key")

    def _may_fetch(self, now: float) -> bool:
        last = self._last_attempt
        if last is None or now < last:  # never tried, or the clock went backwards
            return True
        interval = self._failure_retry_s if not self._keys else self._cooldown_s
        return now - last >= interval

    def _refresh(self, now: float, *, wait: bool) -> None:
        seen = self._attempts
        if wait:
            # Bounded: a fetch in progress ends within about two timeouts.
            if not self._fetch_lock.acquire(timeout=2 * self._timeout_s + 1):
                raise DependencyUnavailable("JWKS endpoint unreachable")
        elif not self._fetch_lock.acquire(blocking=False):
            return
        try:
            if self._attempts != seen:
                return  # another thread fetched while we waited: use its result
            if self._may_fetch(now):
                self._fetch_locked(now)
        finally:
            self._fetch_lock.release()

    def _fetch_locked(self, now: float) -> None:
        self._attempts += 1
        self._last_attempt = now
        try:
            keys = self._fetch()
        except _FetchError as exc:
            self._last_ok = False
            log.warning(
                "JWKS fetch from %s failed (%s); %d cached key(s) stay in use",
                self.jwks_url,
                exc,
                len(self._keys),
            )
            return
        if not keys:
            log.warning("JWKS at %s has no usable signing key", self.jwks_url)
        self._keys = keys
        self._fetched_at = now
        self._last_ok = True

    def _fetch(self) -> dict[str, _JwkEntry]:
        deadline = time.monotonic() + 2 * self._timeout_s
        try:
            with self._session.get(
                self.jwks_url,
                timeout=(self._timeout_s, self._timeout_s),
                headers={"Accept": "application/jwk-set+json, application/json"},
                allow_redirects=False,
                stream=True,
            ) as resp:
                if resp.status_code != 200:
                    raise _FetchError(f"HTTP {resp.status_code}")
                body = _read_body(resp, self._max_jwks_bytes, deadline)
        except requests.RequestException as exc:
            raise _FetchError(type(exc).__name__) from exc
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise _FetchError("not JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise _FetchError("not a JWK Set")
        keys: dict[str, _JwkEntry] = {}
        for jwk_data in document["keys"]:
            loaded = self._load_jwk(jwk_data)
            if loaded is None:
                continue
            kid, entry = loaded
            if kid in keys:
                log.warning("JWKS at %s repeats kid %s; the first is used", self.jwks_url, kid)
                continue
            keys[kid] = entry
        return keys

    def _load_jwk(self, data: Any) -> tuple[str, _JwkEntry] | None:
        """One usable verification key from a JWK, or ``None`` if it must be ignored."""
        if not isinstance(data, dict):
            return None
        kid = data.get("kid")
        if not isinstance(kid, str) or not kid:
            return None
        # RFC 7517 §4.2/4.3: only keys meant for signatures.
        if data.get("use", "sig") != "sig":
            return None
        ops = data.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            return None
        if data.get("kty") == "oct":  # a shared secret never comes from a URL
            return None
        alg = data.get("alg")
        if alg is not None and alg not in self.algorithms:
            return None
        try:
            key = jwt.PyJWK(data).key
            if hasattr(key, "private_bytes"):  # a private JWK published by mistake
                key = key.public_key()
            usable = _algorithms_for_key(key) & self.algorithms
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            log.info("ignoring unusable JWK %s from %s", kid, self.jwks_url)
            return None
        if alg is not None:
            usable &= {alg}
        if not usable:
            return None
        return kid, _JwkEntry(key=key, algorithms=usable)

    def close(self) -> None:
        super().close()
        if self._own_session:
            self._session.close()


# -- remote answers -----------------------------------------------------------


def _remote_audience_ok(audiences: tuple[str, ...] | None, audience: str, required: bool) -> None:
    if audiences is None:
        if required:
            raise TokenRejected("token has no audience")
        return
    if audience not in audiences:
        raise TokenRejected("wrong audience")


def _remote_issuer_ok(issuer: str | None, expected: str, required: bool) -> None:
    if issuer is None:
        if required:
            raise TokenRejected("token has no issuer")
        return
    if issuer != expected:
        raise TokenRejected("wrong issuer")


# -- introspection ------------------------------------------------------------


class IntrospectionVerifier(CachingVerifier):
    """Asks an RFC 7662 introspection endpoint about each token (any server).

    POSTs ``token`` and ``token_type_hint=access_token`` with HTTP Basic client
    authentication (RFC 6749 §2.3.1) over a keep-alive connection pool; no
    redirects are followed. An answer is accepted only if ``active`` is the
    JSON ``true``, it has a ``sub``, ``exp`` (when present) is in the future,
    ``iss`` (when present) equals ``issuer`` and ``aud`` contains ``audience``.
    RFC 7662 makes ``aud`` optional, but without it a token issued for another
    service of the same authorization server would be accepted here, so by
    default an answer without ``aud`` is refused (``require_audience=False``
    relaxes it); ``iss`` is implied by the endpoint, so its absence is accepted
    unless ``require_issuer=True``. An answer without ``exp`` is cached for
    ``cache_ttl_s`` only. A refresh token (``token_type`` ``refresh_token``) is
    refused.

    ``verify`` raises ``DependencyUnavailable`` on connection errors, timeouts,
    any status but 200 (401/403: "introspection client credentials rejected")
    and malformed answers. Construction raises ``ValueError`` when misconfigured.
    """

    def __init__(
        self,
        *,
        introspect_url: str,
        client_id: str,
        client_secret: str,
        issuer: str,
        audience: str,
        require_issuer: bool = False,
        require_audience: bool = True,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        leeway_s: float = DEFAULT_LEEWAY_S,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        max_answer_bytes: int = 65536,
        pool_size: int = 16,
        cache_size: int = DEFAULT_CACHE_SIZE,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_settings(issuer, audience, leeway_s)
        _check_url(introspect_url, "introspect_url")
        if not client_id or not client_secret:
            raise ValueError("client_id and client_secret must be configured")
        if not 0 < timeout_s <= 30:
            raise ValueError("timeout_s must be in (0, 30]")
        super().__init__(
            max_token_bytes=max_token_bytes,
            cache_size=cache_size,
            cache_ttl_s=cache_ttl_s,
            clock=clock,
        )
        self.introspect_url = introspect_url
        self.issuer = issuer
        self.audience = audience
        self.client_id = client_id
        self._require_issuer = require_issuer
        self._require_audience = require_audience
        self._timeout_s = float(timeout_s)
        self._leeway_s = float(leeway_s)
        self._max_answer_bytes = max_answer_bytes
        # RFC 6749 §2.3.1: the client id and secret are form-encoded before Basic encoding.
        pair = f"{_form(client_id)}:{_form(client_secret)}".encode()
        self._headers = {
            "Authorization": "Basic " + base64.b64encode(pair).decode("ascii"),
            "Accept": "application/json",
        }
        self._own_session = session is None
        self._session = session if session is not None else _new_session(pool_size)
        self._credentials_rejected = False

    def _cache_bound(self, principal: Principal) -> float:
        return math.inf if principal.expires_at == 0 else float(principal.expires_at)

    def _verify_uncached(self, token: str, now: float) -> Principal:
        answer = self._introspect(token)
        # RFC 7662 §2.2: "active" is REQUIRED, a boolean; anything but true is inactive.
        if answer.get("active") is not True:
            raise TokenRejected("token not active")
        token_type = answer.get("token_type")
        if isinstance(token_type, str) and token_type.lower() == "refresh_token":
            raise TokenRejected("not an access token")
        exp = _answer_number(answer, "exp")
        nbf = _answer_number(answer, "nbf")
        if exp is not None and exp <= now:
            raise TokenRejected("token expired")
        if nbf is not None and nbf > now + self._leeway_s:
            raise TokenRejected("token not yet valid")
        iss = answer.get("iss")
        if iss is not None and not isinstance(iss, str):
            raise DependencyUnavailable("introspection answer malformed")
        _remote_issuer_ok(iss, self.issuer, self._require_issuer)
        audiences = None
        if answer.get("aud") is not None:
            audiences = _audiences(answer["aud"])
            if audiences is None:
                raise DependencyUnavailable("introspection answer malformed")
        _remote_audience_ok(audiences, self.audience, self._require_audience)
        sub = answer.get("sub")
        if not isinstance(sub, str) or not sub:
            raise TokenRejected("token has no subject")
        scope = answer.get("scope", "")
        client_id = answer.get("client_id", "")
        jti = answer.get("jti", "")
        if not all(isinstance(v, str) for v in (scope, client_id, jti)):
            raise DependencyUnavailable("introspection answer malformed")
        return Principal(
            subject=sub,
            scopes=frozenset(scope.split()),
            expires_at=0 if exp is None else int(exp),
            token_id=jti,
            client_id=client_id,
            issuer=iss or "",
            audience=audiences or (),
        )

    def _introspect(self, token: str) -> dict[str, Any]:
        deadline = time.monotonic() + 2 * self._timeout_s
        try:
            with self._session.post(
                self.introspect_url,
                data={"token": token, "token_type_hint": "access_token"},
                headers=self._headers,
                timeout=(self._timeout_s, self._timeout_s),
                allow_redirects=False,
                stream=True,
            ) as resp:
                status = resp.status_code
                body = _read_body(resp, self._max_answer_bytes, deadline) if status == 200 else b""
        except requests.RequestException:
            raise DependencyUnavailable("introspection endpoint unreachable") from None
        except _FetchError as exc:
            raise DependencyUnavailable(f"introspection endpoint {exc}") from None
        if status in (401, 403):
            if not self._credentials_rejected:
                self._credentials_rejected = True
                log.error(
                    "introspection client credentials rejected by %s (client id %s)",
                    self.introspect_url,
                    self.client_id,
                )
            raise DependencyUnavailable("introspection client credentials rejected")
        if status != 200:
            raise DependencyUnavailable(f"introspection endpoint answered HTTP {status}")
        self._credentials_rejected = False
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):
            raise DependencyUnavailable("introspection answer malformed") from None
        if not isinstance(answer, dict):
            raise DependencyUnavailable("introspection answer malformed")
        return answer

    def close(self) -> None:
        super().close()
        if self._own_session:
            self._session.close()


def _form(value: str) -> str:
    return urllib.parse.quote_plus(value, safe="")


def _answer_number(answer: dict[str, Any], name: str) -> float | None:
    value = answer.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DependencyUnavailable("introspection answer malformed")
    return float(value)


# -- thrift -------------------------------------------------------------------


class _ClientPool:
    """A small thread-safe pool of Thrift client connections.

    At most ``size`` connections are in use at once; a caller waits at most
    ``wait_s`` for one. Idle connections are reused last-in first-out.
    """

    def __init__(self, factory: Callable[[], Any], size: int, wait_s: float) -> None:
        self._factory = factory
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._wait_s = wait_s
        self._closed = False
        self.opened = 0

    def acquire(self) -> tuple[Any, bool]:
        """A client and whether it was reused; ``DependencyUnavailable``/``OSError`` on failure."""
        if not self._slots.acquire(timeout=self._wait_s):
            raise DependencyUnavailable("auth service connection pool exhausted")
        with self._lock:
            client = self._idle.pop() if self._idle else None
        if client is not None:
            return client, True
        try:
            client = self._factory()
        except BaseException:
            self._slots.release()
            raise
        self.opened += 1
        return client, False

    def release(self, client: Any, *, broken: bool) -> None:
        try:
            if broken or self._closed:
                _close_quietly(client)
            else:
                with self._lock:
                    self._idle.append(client)
        finally:
            self._slots.release()

    @property
    def idle(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            _close_quietly(client)


def _close_quietly(client: Any) -> None:
    with contextlib.suppress(Exception):  # closing a broken connection may fail
        client.close()


def _safe_message(message: Any, default: str) -> str:
    if isinstance(message, str) and 0 < len(message) <= 200 and message.isprintable():
        return message
    return default


class ThriftVerifier(CachingVerifier):
    """Asks the Auth service (``Auth.validate``) over pooled Thrift connections.

    Up to ``pool_size`` connections are kept open; a broken connection is
    discarded and a call that failed on a reused one is retried once on a
    fresh connection (``validate`` is idempotent). Connecting and each read or
    write are bounded by ``timeout_s``. ``Unauthenticated`` becomes
    ``TokenRejected``; ``Unavailable``, transport errors, timeouts and refused
    connections become ``DependencyUnavailable``. The returned principal's
    ``issuer`` is checked when present, its ``audience`` must contain
    ``audience`` (``require_audience=False`` accepts an answer without one).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        issuer: str,
        audience: str,
        framed: bool = False,
        tls: TLSClientConfig | ssl.SSLContext | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        pool_size: int = 8,
        require_issuer: bool = False,
        require_audience: bool = True,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        cache_size: int = DEFAULT_CACHE_SIZE,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_settings(issuer, audience, 0)
        if not host or not 0 < port < 65536:
            raise ValueError("host and port of the Auth service must be configured")
        if not 0 < timeout_s <= 30:
            raise ValueError("timeout_s must be in (0, 30]")
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        super().__init__(
            max_token_bytes=max_token_bytes,
            cache_size=cache_size,
            cache_ttl_s=cache_ttl_s,
            clock=clock,
        )
        self.issuer = issuer
        self.audience = audience
        self.address = (host, port)
        self._require_issuer = require_issuer
        self._require_audience = require_audience

        def connect() -> Any:
            return open_client(
                auth_thrift.Auth,
                host,
                port,
                framed=framed,
                tls=tls,
                timeout_s=timeout_s,
                connect_timeout_s=timeout_s,
            )

        self._pool = _ClientPool(connect, pool_size, timeout_s)

    @property
    def pool(self) -> _ClientPool:
        return self._pool

    def _verify_uncached(self, token: str, now: float) -> Principal:
        result = self._call_validate(token)
        subject = getattr(result, "subject", None)
        expires_at = getattr(result, "expires_at", None)
        if not isinstance(subject, str) or not subject or not isinstance(expires_at, int):
            raise DependencyUnavailable("auth service answer malformed")
        if expires_at <= now:
            raise TokenRejected("token expired")
        issuer = result.issuer or None
        _remote_issuer_ok(issuer, self.issuer, self._require_issuer)
        audiences = tuple(result.audience.split()) if result.audience else None
        _remote_audience_ok(audiences, self.audience, self._require_audience)
        scopes = result.scopes or []
        if not all(isinstance(s, str) for s in scopes):
            raise DependencyUnavailable("auth service answer malformed")
        return Principal(
            subject=subject,
            scopes=frozenset(scopes),
            expires_at=expires_at,
            token_id=result.token_id or "",
            client_id=result.client_id or "",
            issuer=issuer or "",
            audience=audiences or (),
        )

    def _call_validate(self, token: str) -> Any:
        for attempt in (1, 2):
            try:
                client, reused = self._pool.acquire()
            except OSError:
                raise DependencyUnavailable("auth service unreachable") from None
            broken = True
            try:
                result = client.validate(token)
                broken = False
                return result
            except common_thrift.Unauthenticated as exc:
                broken = False
                raise TokenRejected(_safe_message(exc.message, "token rejected")) from None
            except common_thrift.Unavailable:
                broken = False
                raise DependencyUnavailable("auth service unavailable") from None
            except TApplicationException:
                raise DependencyUnavailable("auth service failed") from None
            except TimeoutError:
                raise DependencyUnavailable("auth service timed out") from None
            except Exception:
                # A pooled connection may have been closed by the server (idle timeout,
                # restart): retry once on a fresh one. A fresh connection failing is final.
                if reused and attempt == 1:
                    continue
                raise DependencyUnavailable("auth service unreachable") from None
            finally:
                self._pool.release(client, broken=broken)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        super().close()
        self._pool.close()


# -- factory ------------------------------------------------------------------

_MODES: dict[str, type[CachingVerifier]] = {
    "local": LocalVerifier,
    "jwks": JwksVerifier,
    "introspect": IntrospectionVerifier,
    "thrift": ThriftVerifier,
}


def make_verifier(mode: str, **settings: Any) -> TokenVerifier:
    """Build the verifier for ``mode`` (``local``, ``jwks``, ``introspect``, ``thrift``).

    ``settings`` are the constructor's keywords, plus conveniences for the
    command line: ``public_key_file`` and ``hs256_secret_file`` (local),
    ``client_secret_file`` (introspect) and ``auth_addr="HOST:PORT"`` (thrift).
    Secret files lose a trailing newline. Raises ``ValueError`` for an unknown
    mode or setting or a bad configuration, ``OSError`` for an unreadable file.
    """
    cls = _MODES.get(mode)
    if cls is None:
        raise ValueError(f"unknown verification mode {mode!r}; expected one of {sorted(_MODES)}")
    settings = dict(settings)
    if mode == "local":
        if (path := settings.pop("public_key_file", None)) is not None:
            settings["public_key_pem"] = Path(path).read_bytes()
        if (path := settings.pop("hs256_secret_file", None)) is not None:
            settings["hs256_secret"] = read_secret_file(path)
    elif mode == "introspect":
        if (path := settings.pop("client_secret_file", None)) is not None:
            settings["client_secret"] = read_secret_file(path).decode("utf-8")
    elif mode == "thrift" and (addr := settings.pop("auth_addr", None)) is not None:
        settings["host"], settings["port"] = parse_hostport(addr)
    try:
        verifier = cls(**settings)
    except TypeError as exc:
        raise ValueError(f"bad settings for verification mode {mode!r}: {exc}") from exc
    assert isinstance(verifier, TokenVerifier)
    return verifier
